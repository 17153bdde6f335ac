"""BUILD covers every module and test file, and names only files that exist."""

import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_targets():
    """Evaluates BUILD (Starlark is Python syntax here) with rule functions that record their arguments."""
    targets = {}

    def rule(kind):
        def record(name, srcs=(), deps=(), **kwargs):
            targets[name] = {"kind": kind, "srcs": list(srcs), "deps": list(deps), **kwargs}
        return record

    namespace = {kind: rule(kind) for kind in ("py_library", "py_binary", "py_test")}
    namespace["glob"] = lambda patterns, **_: sorted(
        os.path.relpath(p, ROOT) for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern)))
    namespace["package"] = lambda **_: None
    namespace["filegroup"] = rule("filegroup")
    with open(os.path.join(ROOT, "BUILD")) as f:
        exec(compile(f.read(), "BUILD", "exec"), namespace)  # noqa: S102 - our own BUILD file
    return targets


def test_every_module_and_test_has_a_target():
    targets = build_targets()
    covered = {src for target in targets.values() for src in target["srcs"]}
    modules = {os.path.relpath(p, ROOT)
               for p in glob.glob(os.path.join(ROOT, "mtard_tf", "**", "*.py"), recursive=True)}
    tests = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "*.py"))}
    assert not modules - covered, f"modules missing from BUILD: {sorted(modules - covered)}"
    assert not tests - covered, f"test files missing from BUILD: {sorted(tests - covered)}"
    test_targets = {src for t in targets.values() if t["kind"] == "py_test" for src in t["srcs"]}
    for test_file in tests - {"tests/conftest.py", "tests/support.py"}:
        assert test_file in test_targets, f"{test_file} has no py_test target"


def test_build_names_existing_files_and_targets():
    targets = build_targets()
    for name, target in targets.items():
        for src in target["srcs"]:
            assert os.path.isfile(os.path.join(ROOT, src)), f"{name}: {src} does not exist"
        for dep in target["deps"]:
            if dep.startswith(":"):
                assert dep[1:] in targets, f"{name}: unknown dependency {dep}"
