"""Speed plumbing: threads=auto chooses by timing, a fused optimizer under bf16 clips, and the fixed-shape
decoding step (eager and compiled) gives the tokens of the variable-shape path."""

import json

import pytest
import torch

from gptmini import GPT, GPTConfig
from gptmini import threads as threads_module
from gptmini.common import GptMiniError
from gptmini.generation.sampling import SamplingOptions, sample_tokens
from gptmini.threads import (
    MORE_THREADS_MARGIN,
    ThreadChoice,
    apply_threads,
    check_threads_setting,
    choose_threads,
    thread_candidates,
)
from gptmini.training import module as module_file
from gptmini.training.run import train


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # set_num_threads is process-wide: give the other tests theirs back


def test_thread_candidates_double_up_to_the_core_count():
    assert thread_candidates(1) == [1]
    assert thread_candidates(2) == [1, 2]
    assert thread_candidates(6) == [1, 2, 4, 6]
    assert thread_candidates(8) == [1, 2, 4, 8]


def test_choose_threads_keeps_the_fastest_count(restore_threads):
    # A step that is slow with 2 threads (as on a busy CPU) and fast with 1: the stopwatch must pick 1.
    calls = []

    def step():
        calls.append(torch.get_num_threads())
        if torch.get_num_threads() == 2:
            sum(range(200_000))  # the "collapse": measurably slower

    choice = choose_threads(step, [1, 2], repeats=2)
    assert choice.threads == 1 and choice.how == "auto"
    assert torch.get_num_threads() == 1
    assert set(calls) == {1, 2}
    assert choice.step_ms[2] > choice.step_ms[1]
    assert "threads=auto: 1" in choice.describe()


@pytest.mark.parametrize(
    "step_ms, chosen",
    [
        ({1: 10.0, 2: 9.8, 4: 9.7}, 1),  # 2 and 4% faster: the probe's noise, so the fewest threads
        ({1: 10.0, 2: 9.0, 4: 8.8}, 2),  # 2 threads 10% faster; 4 within 5% of 2
        ({1: 10.0, 2: 9.8, 4: 5.0}, 4),  # a clear winner further up
        ({1: 10.0, 2: 20.0, 4: 9.0}, 4),  # a slow middle count does not hide a faster one
    ],
)
def test_a_larger_thread_count_must_be_clearly_faster(step_ms, chosen, monkeypatch, restore_threads):
    def timed(step, threads, repeats, warmup=1):
        return step_ms[threads] / 1000

    monkeypatch.setattr(threads_module, "time_step", timed)
    choice = choose_threads(lambda: None, [4, 2, 1])  # any order
    assert choice.threads == chosen and torch.get_num_threads() == chosen
    assert choice.step_ms == step_ms


@pytest.mark.parametrize("bad", [0, -2, "many", 1.5, True])
def test_bad_thread_settings_are_one_line(bad):
    with pytest.raises(GptMiniError, match="threads=.* must be auto"):
        check_threads_setting(bad)


def test_explicit_and_default_thread_settings_are_not_timed(restore_threads):
    probe_calls = []
    assert apply_threads(1, probe=lambda: probe_calls.append(1)) == ThreadChoice(1, "set")
    assert apply_threads(None, probe=lambda: probe_calls.append(1)).how == "default"
    assert probe_calls == []


def test_auto_threads_are_timed_and_recorded_in_the_summary(
    tmp_path, tiny_train_overrides, compose_train, restore_threads
):
    summary = train(compose_train([*tiny_train_overrides, "threads=auto"]), out_dir=tmp_path / "run")
    choice = summary["threads_choice"]
    assert choice["how"] == "auto"
    assert summary["threads"] == choice["threads"] == torch.get_num_threads()
    assert set(choice["step_ms"]) == {str(n) for n in thread_candidates()}
    step_ms = {int(n): ms for n, ms in choice["step_ms"].items()}
    chosen = choice["threads"]
    # No larger count was clearly faster; a larger one than 1 was clearly faster than 1.
    assert all(step_ms[n] >= (1 - MORE_THREADS_MARGIN) * step_ms[chosen] for n in step_ms if n > chosen)
    assert chosen == 1 or step_ms[chosen] < (1 - MORE_THREADS_MARGIN) * step_ms[1]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["threads_choice"] == choice


def test_fused_adamw_under_bf16_mixed_trains_with_gradient_clipping(
    tmp_path, tiny_train_overrides, compose_train, monkeypatch
):
    # On a GPU, AdamW is fused; Lightning's mixed-precision plugin refuses to clip for a fused optimizer,
    # which stopped every bf16 GPU run at its first step. CPU AdamW can be fused too: the same path, here,
    # with the one rule (adamw_fused) answering as on CUDA for both the optimizer and the clipping.
    import gptmini.training.optim as optim_file

    for file in (optim_file, module_file):
        monkeypatch.setattr(file, "adamw_fused", lambda *_: True)
    overrides = [*tiny_train_overrides, "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=0.5"]
    summary = train(compose_train(overrides), out_dir=tmp_path / "run")
    assert summary["steps"] == 12
    assert summary["val_loss"] == pytest.approx(summary["val_loss"])  # finite: NaN != NaN


# ----- the fixed-shape decoding step --------------------------------------------------------------------


SWITCHES = {
    "gpt2": {},
    "modern": {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "n_kv_head": 1,
               "tie_embeddings": False, "logit_softcap": 15.0},
}  # fmt: skip


def tiny_model(**switches) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, **switches)
    return GPT(config).eval()


@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
def test_decode_step_gives_the_logits_of_the_variable_shape_path(switches):
    model = tiny_model(**switches)
    prompt = torch.randint(0, 97, (3, 5))
    with torch.inference_mode():
        reference, cache = model.new_kv_cache(3), model.new_kv_cache(3)
        model.next_token_logits(prompt, kv_cache=reference)
        model.next_token_logits(prompt, kv_cache=cache)
        token = torch.randint(0, 97, (3, 1))
        for _ in range(6):
            expected = model.next_token_logits(token, kv_cache=reference)
            got = model.decode_step(token, cache.positions[cache.length], cache)
            cache.length += 1
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            token = got.argmax(-1, keepdim=True)


@pytest.mark.parametrize("switches", SWITCHES.values(), ids=SWITCHES.keys())
def test_cached_decoding_picks_the_tokens_of_full_recomputation_across_a_slide(switches):
    model = tiny_model(**switches)
    greedy = SamplingOptions(max_new_tokens=40, temperature=0.0)  # block 16: the context slides twice
    prompt = torch.tensor([3, 1, 4, 1, 5])
    cached = torch.cat(list(sample_tokens(model, prompt, greedy, use_cache=True)), dim=1)
    recomputed = torch.cat(list(sample_tokens(model, prompt, greedy, use_cache=False)), dim=1)
    assert torch.equal(cached, recomputed)


@pytest.mark.slow
def test_compiled_decoding_step_picks_the_same_tokens():
    model = tiny_model(**SWITCHES["modern"])
    greedy = SamplingOptions(max_new_tokens=24, temperature=0.0)
    prompt = torch.tensor([7, 8, 9])
    eager = torch.cat(list(sample_tokens(model, prompt, greedy)), dim=1)
    compiled = torch.cat(list(sample_tokens(model, prompt, greedy, compile=True)), dim=1)
    assert torch.equal(eager, compiled)
    assert model._compiled_decode_step is not None  # made once, kept for the next sample


def test_training_on_a_gpu_lets_float32_matmuls_use_tf32():
    from types import SimpleNamespace

    from gptmini.training.run import use_tensor_cores

    def trainer_on(device: str):
        return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        use_tensor_cores(trainer_on("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"  # a CPU run's numerics are left alone
        use_tensor_cores(trainer_on("cuda"))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
