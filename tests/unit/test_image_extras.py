"""Every image a component names exists in images/, and its extra installs what the component imports.

A static check, with what it does not see stated: the Dockerfiles are read, not
built, and a component's imports (its body's, then every module of ours they
reach, lazy imports included) are resolved against the installed package
metadata of the image's extra. It cannot see what a component needs that is not
an import: a subprocess it starts (the local backend's model servers), a file or
a command in the image, nor which of the imports it finds a step never makes.
tests/images runs each executor in its built image: the contract test of the
images themselves.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import inspect
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import defectkit
from defectkit_kfp.components import images

ROOT = Path(__file__).resolve().parents[2]
COMPONENT_MODULES = sorted(p.stem for p in (ROOT / "components").glob("*.py") if p.stem not in ("__init__", "images"))
LOCAL_PACKAGES = {"defectkit", "defectkit_kfp"}


def _components():
    for name in COMPONENT_MODULES:
        module = importlib.import_module(f"defectkit_kfp.components.{name}")
        yield name, getattr(module, name)


def _image_name(component) -> str:
    image = component.component_spec.implementation.container.image
    registry, _, rest = image.rpartition("/")
    assert registry == images.REGISTRY, image
    name, _, tag = rest.partition(":")
    assert tag == defectkit.__version__, f"{image}: tag must be the package version {defectkit.__version__}"
    return name


def _extra_of(dockerfile: str) -> str:
    found = re.findall(r'pip install --constraint constraints\.txt "\.\[(\w+)\]"', dockerfile)
    assert len(found) == 1, "each image installs exactly one extra, with the constraints"
    return found[0]


def test_versions_agree():
    assert images.VERSION == defectkit.__version__


@pytest.mark.parametrize("name", sorted(p.parent.name for p in (ROOT / "images").glob("*/Dockerfile")))
def test_dockerfiles_are_pinned_and_non_root(name):
    text = (ROOT / "images" / name / "Dockerfile").read_text()
    assert re.search(r"^FROM\s+\$\{BASE_IMAGE\}\s*$", text, re.M), \
        f"{name}: the base must be the BASE_IMAGE build argument, so images build where Docker Hub cannot be reached"
    defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), base)
             for base in re.findall(r"^FROM\s+(\S+)", text, re.M)]
    assert bases, "no FROM"
    for base in bases:
        assert ":" in base and not base.endswith(":latest"), f"{name}: base image {base} is not pinned"
        assert re.search(r":\d+\.\d+\.\d+", base), f"{name}: base image {base} needs an exact version tag"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: must end as a non-root user"
    _extra_of(text)


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:``, whose imports never run."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _third_party_imports(module_name: str, seen: set[str]) -> set[str]:
    """Top-level third-party modules imported anywhere (lazily too) by a local module and its local imports."""
    if module_name in seen:
        return set()
    seen.add(module_name)
    module = importlib.import_module(module_name)
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(inspect.getsource(module))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            top = name.split(".")[0]
            if top in LOCAL_PACKAGES:
                try:
                    importlib.import_module(name)
                except ImportError:
                    continue
                if inspect.ismodule(sys.modules.get(name)):
                    found |= _third_party_imports(name, seen)
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def _imported_modules(node: ast.ImportFrom) -> list[str]:
    """The modules ``from X import a, b`` loads: ``X.a`` where ``a`` is a submodule, else ``X`` itself."""
    names = []
    for alias in node.names:
        qualified = f"{node.module}.{alias.name}"
        try:
            importlib.import_module(qualified)
            names.append(qualified)
        except ModuleNotFoundError:
            names.append(node.module)
    return names


def _component_imports(component) -> set[str]:
    found: set[str] = set()
    seen: set[str] = set()
    tree = ast.parse(inspect.getsource(component.python_func))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top in LOCAL_PACKAGES:
                for name in _imported_modules(node):
                    found |= _third_party_imports(name, seen)
            elif top not in sys.stdlib_module_names:
                found.add(top)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in LOCAL_PACKAGES:
                    found |= _third_party_imports(alias.name, seen)
                elif top not in sys.stdlib_module_names:
                    found.add(top)
    return found


def test_every_local_import_of_a_component_is_followed():
    """The delivery components import ``from defectkit.delivery import ...``: those modules are scanned too."""
    deploy = dict(_components())["deploy_canary"]
    assert "mlflow" in _component_imports(deploy)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(extra: str) -> set[str]:
    """Distributions installed by `pip install defectkit[extra]`, transitively."""
    todo = []
    for line in md.requires("defectkit") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": extra}):
            todo.append(req)
    dists: set[str] = set()
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in dists or name == "defectkit":
            continue
        dists.add(name)
        for line in md.requires(req.name) or []:
            sub = Requirement(line)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return dists


# Modules the scan reaches that these steps never import in their image. Both reach
# defectkit.serving.server, whose model loading (torch, onnxruntime) the kserve manifest never
# calls, and the local backend's model servers, which need torch the deploy image
# leaves out. Running the executors in the built image checks what the scan cannot
# (tests/images/test_executor_contract.py): restore_traffic on both backends, and
# deploy_canary refusing backend=local there.
NOT_IMPORTED_IN_THE_IMAGE = {
    "deploy_canary": {"torch", "torchvision", "onnxruntime"},
    "restore_traffic": {"torch", "torchvision", "onnxruntime"},
}


@pytest.mark.parametrize("name, component", list(_components()))
def test_component_image_exists_and_its_extra_covers_its_imports(name, component):
    image = _image_name(component)
    dockerfile = ROOT / "images" / image / "Dockerfile"
    assert dockerfile.is_file(), f"{name} runs on {image}, which has no images/{image}/Dockerfile"
    installed = _closure(_extra_of(dockerfile.read_text()))
    providers = md.packages_distributions()
    missing = {}
    for module in _component_imports(component) - NOT_IMPORTED_IN_THE_IMAGE.get(name, set()):
        dists = {_norm(d) for d in providers.get(module, [])}
        assert dists, f"{name} imports {module}, which no installed distribution provides"
        if not dists & installed:
            missing[module] = sorted(dists)
    assert not missing, f"{name} on image {image} imports modules its extra does not install: {missing}"
