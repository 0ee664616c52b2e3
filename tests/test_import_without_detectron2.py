import subprocess
import sys

CODE = """
import sys
sys.modules['detectron2'] = None  # makes 'import detectron2' fail, as on a machine without it
import afigan
assert afigan.HAS_DETECTRON2 is False
from afigan.layers import AFInterpolator, FeaturePatchDiscriminator, build_upsampler
from afigan.data.toy_shapes import make_toy_dataset
assert not any(m.startswith('detectron2.') for m in sys.modules)
try:
    afigan.add_afigan_config
except ImportError as e:
    print('IMPORT-ERROR:', e)
"""


def test_afigan_imports_and_layers_work_without_detectron2():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORT-ERROR: afigan.add_afigan_config needs Detectron2" in out.stdout
