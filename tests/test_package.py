"""Every module of the package imports in one process, and importing one defines no flag (each command defines its
flags in its define_flags(), which its run() calls), so the commands' flags cannot clash on import."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT_ALL = """
import importlib, importlib.util, json, pkgutil
from absl import flags
import mtard_tf
torch = importlib.util.find_spec("torch") is not None
imported = []
for module in pkgutil.walk_packages(mtard_tf.__path__, "mtard_tf."):
    if torch or not module.name.startswith("mtard_tf.pytorch."):
        importlib.import_module(module.name)
        imported.append(module.name)
ours = {module: [flag.name for flag in defined] for module, defined in flags.FLAGS.flags_by_module_dict().items()
        if module.startswith("mtard_tf")}
print(json.dumps({"imported": imported, "flags": ours}))
"""


def test_every_module_imports_in_one_process_without_defining_flags():
    import json
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    modules = {os.path.relpath(os.path.join(directory, name), ROOT)[:-len(".py")].replace(os.sep, ".")
               for directory, _, names in os.walk(os.path.join(ROOT, "mtard_tf"))
               for name in names if name.endswith(".py") and name != "__init__.py"}
    assert modules <= set(report["imported"]) | {m for m in modules if m.startswith("mtard_tf.pytorch.")}
    assert report["flags"] == {}
