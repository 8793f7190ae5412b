"""scripts/setup_env.sh stops at a failing pip step with pip's own message and a non-zero status (it used to pipe
every step through ``grep ... || true``, so a failed install passed and only a later import might notice).

Offline and fast: a throwaway virtual environment and pip told to use no index, so its first install step
cannot find ``wheel`` and fails at once, as any step would without the package it asks for."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_failing_pip_step_stops_setup_env_with_pips_message(tmp_path):
    venv = tmp_path / "venv"
    # a clean environment: no pip configuration of this machine (local indexes, find-links), no index at all
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "VENV": str(venv),
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup_env.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "No matching distribution found for wheel" in output  # pip's own words
    # nothing after the failing step ran: not the torch step (the old script went on through every step and
    # only its final import check failed), not the check, no stamp
    assert "torch" not in output and "env ready" not in output and not (venv / ".getok-installed").exists()
