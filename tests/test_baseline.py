"""The hf-generate baseline: outputs equal unbatched generate(); timestamps follow static batching."""

from __future__ import annotations

import pytest
import torch

import splitlab
from splitlab.workload import LengthDist, fixed_batch, from_prompts


def run_hf_generate(workload, model, **kwargs):
    """The hf-generate mode, through the one entry point."""
    return splitlab.run(workload, model, mode="hf-generate", **kwargs)


def direct_generate(loaded, prompt_ids, n):
    """The oracle, written out here: one prompt, no padding, greedy, exactly n new tokens."""
    ids = torch.tensor([list(prompt_ids)])
    with torch.inference_mode():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=n, min_new_tokens=n,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_batched_outputs_equal_unbatched_generate_on_tiny(tiny):
    # different prompt lengths (so rows are left-padded) and different output lengths per request
    wl = fixed_batch(11, LengthDist.uniform(2, 60), LengthDist.uniform(1, 20), model=tiny, seed=5)
    run = splitlab.run(wl, tiny, mode="hf-generate", batch_size=4, progress=False)
    got = run.output_ids()
    for r in wl:
        assert len(got[r.id]) == r.max_new_tokens
        assert got[r.id] == direct_generate(tiny, r.prompt_ids, r.max_new_tokens), f"request {r.id}"


class _PrefersEos(torch.nn.Module):
    """An LM head whose greedy choice is always EOS, with token 10 the runner-up."""

    def __init__(self, vocab, eos):
        super().__init__()
        self.vocab, self.eos = vocab, eos

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocab)
        logits[..., self.eos] = 2.0
        logits[..., 10] = 1.0
        return logits


def test_eos_is_ignored_so_lengths_are_exact():
    m = splitlab.load_model("tiny", seed=0)
    m.model.lm_head = _PrefersEos(m.facts.vocab_size, m.model.config.eos_token_id)
    wl = fixed_batch(3, 5, 7, model=m, seed=0)
    run = run_hf_generate(wl, m, batch_size=2, progress=False)
    for ids in run.output_ids().values():
        assert ids == [10] * 7  # EOS forbidden until the asked length: the runner-up every time
    assert all(len(t.token_times_s) == 7 for t in run.traces)


def test_timestamps_follow_static_batching(tiny):
    prompts = [tiny.encode(t) for t in ("alpha", "beta gamma", "delta", "epsilon zeta eta", "theta")]
    arrivals = [0.0, 0.05, 0.30, 0.31, 0.32]
    wl = from_prompts(prompts, [6, 3, 5, 2, 4], arrivals_s=arrivals)
    run = run_hf_generate(wl, tiny, batch_size=2, progress=False)
    tr = {t.id: t for t in run.traces}
    # batches in arrival order: {0,1}, {2,3}, {4}; each starts once its last member has arrived
    assert tr[0].prefill_start_s == tr[1].prefill_start_s >= 0.05
    assert tr[2].prefill_start_s == tr[3].prefill_start_s >= 0.31
    assert tr[4].prefill_start_s >= 0.32
    # ... and once the previous batch is done
    assert tr[2].prefill_start_s >= max(tr[0].token_times_s[-1], tr[1].token_times_s[-1])
    assert tr[4].prefill_start_s >= max(tr[2].token_times_s[-1], tr[3].token_times_s[-1])
    for t in run.traces:
        assert len(t.token_times_s) == len(t.output_ids) == t.max_new_tokens
        assert t.arrival_s <= t.prefill_start_s < t.prefill_end_s == t.token_times_s[0]
        assert all(b > a for a, b in zip(t.token_times_s, t.token_times_s[1:]))
        assert t.worker == "generate" and t.finished
    # one request in a batch stops taking tokens at its own length; the batch goes on
    assert tr[1].token_times_s == tr[0].token_times_s[:3]
    kinds = [(s.kind, tuple(s.request_ids)) for s in run.steps]
    assert kinds == [("prefill", (0, 1)), ("decode", (0, 1)), ("prefill", (2, 3)), ("decode", (2, 3)),
                     ("prefill", (4,)), ("decode", (4,))]
    assert run.steps[0].num_tokens == len(prompts[0]) + len(prompts[1])
    assert run.steps[0].end_s == tr[0].token_times_s[0]
    table = run.requests.set_index("id")
    assert table.loc[2, "queue_s"] > 0  # waited for request 3 and for the first batch
    assert run.wall_s == pytest.approx(max(t.token_times_s[-1] for t in run.traces))
    assert run.mode == "hf-generate" and run.model == "tiny" and run.config.batch_size == 2
    assert run.env["device"] in ("cpu", "cuda")


def test_run_via_engine_records_the_slo(tiny):
    wl = fixed_batch(3, 8, 4, model=tiny, seed=0)
    slo = splitlab.SLO(ttft_s=5.0, tpot_s=1.0)
    run = splitlab.run(wl, "tiny", batch_size=8, slo=slo, progress=False)  # spec string loads the model
    s = run.summary()
    assert s["slo_ttft_s"] == 5.0 and s["slo_met"] == 3 and s["completed"] == 3
    assert s["output_tokens"] == 12


@pytest.mark.slow
def test_batched_outputs_equal_unbatched_on_smollm2(smollm2):
    """Left padding changes matmul shapes; on SmolLM2 fp32 CPU the greedy tokens still match."""
    questions = ["What is the capital of France?", "Name a fruit that is yellow.",
                 "Say hello in Spanish.", "What is two plus two?"]
    wl = from_prompts([smollm2.encode(q, chat=True) for q in questions], 10)
    assert len({r.prompt_len for r in wl}) > 1  # rows really are padded
    run = run_hf_generate(wl, smollm2, batch_size=4, progress=False)
    got = run.output_ids()
    for r in wl:
        assert got[r.id] == direct_generate(smollm2, r.prompt_ids, 10), f"request {r.id}"
    assert "Paris" in smollm2.decode(got[0])
