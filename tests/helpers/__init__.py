"""Helpers shared by the tests (no tests here). pyproject.toml puts tests/ on sys.path (pytest's pythonpath), so a
test imports them as `from helpers.fixture_models import ...` from any folder.

- fixture_models: the golden model fixtures (tests/fixtures/<name>/io.npz) and how their references were fed;
- adapter_models, eval_models, moe_models: tiny random checkpoints written with transformers for a test;
- reference_files: checkpoint files read back with the reference libraries (safetensors, torch.load);
- convert_synth: malformed safetensors files and a synthetic checkpoint for glm-convert's fault tests;
- train_runs: tiny glm-train configs and readers of a run folder (metrics, checkpoints, params).
- cli: the commands run in this process or a subprocess, their exit code and output as one Result.
"""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository
FIX = ROOT / "tests" / "fixtures"
SFT_EXAMPLES = ROOT / "train" / "data" / "sft"  # the bundled SFT example data
