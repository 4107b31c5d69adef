"""The console script sets OpenMP's passive wait policy before torch is imported (and keeps a
user's own choice): two torch processes on the same cores otherwise thrash (docs/reliability.md)."""

import os
import subprocess
import sys

PROBE = ("import sys; from reclight import launch; launch.configure_process(); "
         "assert 'torch' not in sys.modules, 'torch imported before the policy was set'; "
         "import os; print(os.environ['OMP_WAIT_POLICY'])")


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env_extra
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout


def test_passive_by_default_before_torch_and_the_users_choice_wins():
    assert _run({}).strip() == "PASSIVE"
    assert _run({"OMP_WAIT_POLICY": "ACTIVE"}).strip() == "ACTIVE"
