"""The wheel ships the core, the components and the pipelines without clashing with a user's packages."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPED = {"defectkit_kfp.components": "components", "defectkit_kfp.pipelines": "pipelines"}


def _options() -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser["options"]


def _tree_packages() -> set[str]:
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "defectkit").rglob("__init__.py")}
    for package, folder in MAPPED.items():
        found |= {package + "".join("." + part for part in p.parent.relative_to(ROOT / folder).parts)
                  for p in (ROOT / folder).rglob("__init__.py")}
    return found


def test_setup_cfg_lists_every_package_of_the_tree():
    listed = set(_options()["packages"].split())
    assert listed == _tree_packages()


def test_components_and_pipelines_install_under_defectkit_kfp(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("defectkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"defectkit", "defectkit_kfp"}
    for yaml_file in (ROOT / "pipelines").glob("*.yaml"):
        assert f"defectkit_kfp/pipelines/{yaml_file.name}" in names
    assert "defectkit_kfp/components/images.py" in names
