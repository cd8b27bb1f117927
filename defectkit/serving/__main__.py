from defectkit.serving.server import main

raise SystemExit(main())
