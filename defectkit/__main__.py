from defectkit.cli import main

raise SystemExit(main())
