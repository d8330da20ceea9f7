"""compile_only: the train step compiled ahead of time for a TPU topology (libtpu) on this CPU host."""

import json

from helpers.train_runs import CACHE


def test_compile_only_v5e_2x2_writes_a_report(tmp_path, capsys):
    from train.main import main

    out = tmp_path / "plan"
    rc = main(
        [
            "--config",
            "tiny",
            f"output_dir={out}",
            "compile_only=true",
            "topology=v5e:2x2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            "scan_layers=true",
            "remat=full",
            "batch_size=4",
            "grad_accum=2",
            f"compilation_cache_dir={CACHE}",
        ]
    )
    assert rc == 0
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: fits — ") and "v5e:2x2, mesh" in verdict
    r = json.loads((out / "compile_report.json").read_text())
    assert r["devices"] == 4 and r["device_kind"].startswith("TPU v5")
    assert r["mesh"] == {"data": 1, "fsdp": 2, "expert": 1, "context": 1, "tensor": 2}
    assert 0 < r["peak_memory_bytes_per_device"] < r["hbm_bytes_per_device"] and r["fits"] is True
    assert r["flops"] > 0 and r["model_flops_per_step"] > 0
    # the scanned, accumulated step counts one layer and one microbatch: the extrapolation restores the rest
    assert r["flops_xla_measured"] > 1.5 * r["flops_xla_as_compiled"]
    assert 1.0 < r["xla_over_model_flops"] < 2.5  # full remat recomputes the forward pass
    assert "extrapolated" in r["flops_source"]["flops_xla_measured"]


def test_unknown_topology_is_bad_input(tmp_path, capsys):
    from train.main import main

    rc = main(["--config", "tiny", f"output_dir={tmp_path}", "compile_only=true", "topology=v5e:banana"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: topology")
