"""The step benchmark's floors are the same computation as the project's objectives: each hand-written loss
equals the Pyro objective's value and gradients at the same random draws (float64), and the compiled
training step gives the eager step's loss and gradients on the same draws."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.benchmark_steps import MODELS, VARIANTS, build_case, main
from inference.cuda_graph import StepNotCapturable

CPU = torch.device("cpu")


def _loss_and_grads(case, fn, seed):
    for p in case.module.parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in case.module.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


@pytest.mark.parametrize("name", MODELS)
def test_handwritten_loss_equals_the_objective_value_and_gradients(name):
    case = build_case(name, "quick", 4, CPU, seed=0, dtype=torch.float64)
    m = case.module
    pyro_value, pyro_grads = _loss_and_grads(
        case, lambda: case.objective.differentiable_loss(m.model, m.guide, *case.inputs), seed=7)
    hand_value, hand_grads = _loss_and_grads(case, lambda: case.handwritten(m, *case.inputs), seed=7)
    assert hand_value == pytest.approx(pyro_value, rel=1e-12)
    assert set(hand_grads) == set(pyro_grads) and len(hand_grads) > 0
    for n, g in pyro_grads.items():
        assert torch.allclose(hand_grads[n], g, rtol=1e-9, atol=1e-12), n
    # Other draws give another value: the agreement is not of a loss that ignores its noise.
    other, _ = _loss_and_grads(case, lambda: case.handwritten(m, *case.inputs), seed=8)
    assert other != pytest.approx(pyro_value, rel=1e-9)


def _compiled_matches_eager(name):
    import torch._inductor.config as inductor

    case = build_case(name, "quick", 4, CPU, seed=0, dtype=torch.float64)
    m = case.module
    torch._dynamo.reset()
    compiled = torch.compile(case.handwritten)
    before = inductor.fallback_random
    inductor.fallback_random = True  # the compiled graph draws from torch's generator, as eager does
    try:
        c_value, c_grads = _loss_and_grads(case, lambda: compiled(m, *case.inputs), seed=3)
    finally:
        inductor.fallback_random = before
        torch._dynamo.reset()
    e_value, e_grads = _loss_and_grads(case, lambda: case.handwritten(m, *case.inputs), seed=3)
    assert c_value == pytest.approx(e_value, rel=1e-12)
    assert set(c_grads) == set(e_grads)
    for n, g in e_grads.items():
        assert torch.allclose(c_grads[n], g, rtol=1e-9, atol=1e-12), n


def test_compiled_step_equals_eager_step_vae():
    _compiled_matches_eager("vae")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpsi-add", "lstm-add", "draw-extended-add"])
def test_compiled_step_equals_eager_step(name):
    _compiled_matches_eager(name)


def test_cli_writes_a_report_and_rejects_unknown_models(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--models", "vae", "--sizes", "quick", "--batch-size", "4", "--repeats", "2",
                 "--warmup", "1", "--no-progress", "--out", str(out)]) == 0
    page = (out / "benchmark.md").read_text()
    assert "vae" in page and "handwritten" in page and "Environment" in page
    # Every variant ran, the two compiled ones included (the networks' compiled step too); all but the
    # captured step, which runs on CUDA only.
    timed = json.loads((out / "benchmark.json").read_text())["models"][0]["variants"]
    assert set(timed) == set(VARIANTS) - {"cuda-graph"}
    with pytest.raises(SystemExit):
        main(["--models", "vae,nope", "--out", str(tmp_path / "x")])
    assert "unknown ['nope']" in capsys.readouterr().err


_FAST = ["--sizes", "quick", "--batch-size", "4", "--repeats", "2", "--warmup", "0", "--no-compile",
         "--no-progress"]


def test_a_stopped_benchmark_keeps_its_timed_models_and_resume_times_the_rest(tmp_path, monkeypatch, capsys):
    import experiments.benchmark_steps as bs

    out = tmp_path / "bench"
    real = bs.bench_model

    def stopped_at_diffusion(name, *args, **kwargs):
        if name == "diffusion-gaussian":
            raise KeyboardInterrupt  # a time limit's kill, as far as the report is concerned
        return real(name, *args, **kwargs)
    monkeypatch.setattr(bs, "bench_model", stopped_at_diffusion)
    with pytest.raises(KeyboardInterrupt):
        main(["--models", "vae,diffusion-gaussian", *_FAST, "--out", str(out)])
    partial = json.loads((out / "benchmark.json").read_text())
    assert [m["model"] for m in partial["models"]] == ["vae"]
    assert partial["complete"] is False and partial["models_pending"] == ["diffusion-gaussian"]
    assert "Incomplete" in (out / "benchmark.md").read_text()

    monkeypatch.setattr(bs, "bench_model", real)
    # An existing benchmark is not overwritten, and a resume must keep the settings it ran with.
    with pytest.raises(SystemExit):
        main(["--models", "vae,diffusion-gaussian", *_FAST, "--out", str(out)])
    assert "--resume continues it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--models", "vae,diffusion-gaussian", *_FAST, "--repeats", "3", "--out", str(out), "--resume"])
    assert "repeats=2 (now 3)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a resume with fewer models would drop the timed rows from the page
        main(["--models", "diffusion-gaussian", *_FAST, "--out", str(out), "--resume"])
    assert "models_requested" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--models", "vae,diffusion-gaussian", *_FAST, "--out", str(out), "--resume", "--force"])
    assert "give one" in capsys.readouterr().err
    # An error inside the benchmark is no usage error: it propagates with its traceback.
    monkeypatch.setattr(bs, "bench_model", lambda *a, **k: (_ for _ in ()).throw(ValueError("inside")))
    with pytest.raises(ValueError, match="inside"):
        main(["--models", "vae,diffusion-gaussian", *_FAST, "--out", str(out), "--resume"])
    monkeypatch.setattr(bs, "bench_model", real)

    assert main(["--models", "vae,diffusion-gaussian", *_FAST, "--out", str(out), "--resume"]) == 0
    full = json.loads((out / "benchmark.json").read_text())
    assert full["complete"] is True and full["models_pending"] == []
    assert [m["model"] for m in full["models"]] == ["vae", "diffusion-gaussian"]
    assert full["models"][0] == partial["models"][0]  # the timed model is kept as it was, not re-timed
    assert full["wall_seconds"] > partial["wall_seconds"]
    assert "Incomplete" not in (out / "benchmark.md").read_text()


def test_a_failing_cuda_graph_variant_is_recorded_and_the_rest_still_timed(tmp_path, monkeypatch):
    import experiments.benchmark_steps as bs

    real = bs.make_actions

    def with_a_failing_capture(case, compiled):
        actions = real(case, compiled)

        def capture():
            raise StepNotCapturable("reads back: Tensor.item")
        actions["cuda-graph"] = capture  # as on a GPU, where this variant exists
        return actions
    monkeypatch.setattr(bs, "make_actions", with_a_failing_capture)
    out = tmp_path / "bench"
    assert main(["--models", "vae", *_FAST, "--out", str(out)]) == 0
    row = json.loads((out / "benchmark.json").read_text())["models"][0]
    assert row["cuda_graph_error"] == "StepNotCapturable: reads back: Tensor.item"
    assert "cuda-graph" not in row["variants"] and "fused" in row["variants"]
    assert "reads back: Tensor.item" in (out / "benchmark.md").read_text()


def test_variants_are_chosen_and_must_include_the_baseline(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--models", "vae", *_FAST, "--variants", "handwritten,fused", "--out", str(out)]) == 0
    row = json.loads((out / "benchmark.json").read_text())["models"][0]
    assert set(row["variants"]) == {"handwritten", "fused"}
    for bad, said in (("fused", "the baseline 'handwritten' is missing"), ("handwritten,svi-x", "unknown")):
        with pytest.raises(SystemExit):
            main(["--models", "vae", *_FAST, "--variants", bad, "--out", str(tmp_path / "x")])
        assert said in capsys.readouterr().err
