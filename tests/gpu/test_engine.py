"""The compiled engine on the GPU: each Triton kernel against its PyTorch reference at real
Llama shapes, CUDA-graph replay against eager steps, the decode path against the PyTorch
reference runner and against HF, the opt-in GEMV against cuBLAS, and every prefill SDPA
backend against PyTorch's own choice."""

from __future__ import annotations

import math
import random

import pytest
import torch

from _gpu_helpers import hf_greedy, make_runner, rand_ids

pytestmark = pytest.mark.gpu


def err(u: torch.Tensor, v: torch.Tensor) -> float:
    """max |u - v| / max(1, |v|): absolute below 1, relative above (bf16 spacing grows with
    magnitude: 1 ulp at 4..8 is 0.031)."""
    u, v = u.float(), v.float()
    return ((u - v).abs() / v.abs().clamp(min=1.0)).max().item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]


@pytest.fixture(scope="module", params=["atomic", "kernel"])
def kernels(request):
    from splitlab.engine.kernels import TorchKernels, TritonKernels

    return TritonKernels(combine=request.param), TorchKernels()


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_kernels_match_the_reference(kernels, dtype):
    tk, ref = kernels
    torch.manual_seed(0)
    x = torch.randn(37, 4096, device="cuda", dtype=dtype)
    r, w = torch.randn_like(x), torch.rand(4096, device="cuda", dtype=dtype) + 0.5
    (a, ar), (b, br) = tk.add_rmsnorm(x, r, w, 1e-5), ref.add_rmsnorm(x, r, w, 1e-5)
    assert max(err(a, b), err(ar, br)) <= TOL[dtype]
    gu = torch.randn(37, 2 * 14336, device="cuda", dtype=dtype)
    assert err(tk.silu_mul(gu), ref.silu_mul(gu)) <= TOL[dtype]
    table, tok = torch.randn(1000, 4096, device="cuda", dtype=dtype), torch.tensor([0, 999, 5, 5], device="cuda")
    (a1, a2), (b1, b2) = tk.embed_rmsnorm(tok, table, w, 1e-5), ref.embed_rmsnorm(tok, table, w, 1e-5)
    assert max(err(a1, b1), err(a2, b2)) <= TOL[dtype]


def rope(d: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    emb = torch.cat([torch.arange(t, device="cuda").float()[:, None] * inv] * 2, -1)
    return emb.cos().contiguous(), emb.sin().contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kv_write_matches_the_reference(kernels, dtype):
    hq, hkv, d, t, slots = 32, 8, 128, 300, 6
    torch.manual_seed(1)
    qkv = torch.randn(9, (hq + 2 * hkv) * d, device="cuda", dtype=dtype)
    pos = torch.tensor([0, 1, 5, 7, 3, 299, 100, 4, 2], device="cuda")
    slot = torch.tensor([0, 1, 2, 0, 3, 1, 4, 5, 6], device="cuda")
    cos, sin = rope(d, t)
    outs = []
    for impl in kernels:
        q, kc = qkv.clone(), torch.zeros((slots + 1) * t, hkv, d, device="cuda", dtype=dtype)
        vc = torch.zeros_like(kc)
        impl.rope_kv_write(q, pos, slot * t + pos, cos, sin, kc, vc, hq, hkv, d)
        outs.append((q, kc, vc))
    assert max(err(u, v) for u, v in zip(*outs)) <= TOL[dtype]


CASES = [(1, [1]), (1, [2048]), (3, [5, 1024, 130]), (8, [64, 65, 1, 2000, 7, 512, 513, 100]), (40, [1025] * 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, lens", CASES, ids=[f"b{b}" for b, _ in CASES])
def test_decode_attention_matches_the_reference(kernels, dtype, batch, lens):
    """Split-K decode attention (1, 4 and the kernel's own split count) and the fused RoPE +
    KV write + attention kernel against the two reference ops; at batch 8, every decode
    variant the runner may pick."""
    from splitlab.engine.kernels import DECODE_VARIANTS, TritonKernels

    tk, ref = kernels
    hq, hkv, d, scale = 32, 8, 128, 128 ** -0.5
    torch.manual_seed(2)
    kl = torch.randn(max(batch, 6) + 1, 2048, hkv, d, device="cuda", dtype=dtype)
    vl = torch.randn_like(kl)
    s = torch.randperm(kl.shape[0] - 1, device="cuda")[:batch]  # distinct slots, scrambled
    n = torch.tensor(lens, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=dtype)
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, device="cuda", dtype=dtype)
    cos, sin = rope(d, 2048)
    want = ref.decode_attention(q, kl, vl, s, n, scale)
    kr, vr = kl.clone(), vl.clone()
    want_fused = ref.decode_attention_rope(qkv.clone(), s, n, cos, sin, kr, vr, hq, hkv, d, scale, max_len=2048)
    runs = [(tk, {"num_splits": splits}) for splits in (1, 4, None)]
    if batch == 8 and dtype == torch.bfloat16:
        runs += [(TritonKernels(combine=tk.combine), {"variant": v}) for v in DECODE_VARIANTS.values()]
    for impl, kw in runs:
        assert err(impl.decode_attention(q, kl, vl, s, n, scale, max_len=2048, **kw), want) <= TOL[dtype], kw
        if "variant" in kw and not kw["variant"].rope_fused:
            continue
        kf, vf = kl.clone(), vl.clone()
        got = impl.decode_attention_rope(qkv.clone(), s, n, cos, sin, kf, vf, hq, hkv, d, scale, max_len=2048, **kw)
        assert err(got, want_fused) <= TOL[dtype], kw
        assert max(err(kf, kr), err(vf, vr)) <= TOL[dtype], kw


def test_graph_replay_gives_the_tokens_of_eager_steps(fp32_model):
    """The same prompts decoded by a runner replaying CUDA graphs (batch 3 pads to the bucket of
    4) and by one launching eagerly, fp32: identical tokens, step after step."""
    graphs = make_runner(fp32_model, 8, 256, cuda_graphs=True, decode_variant="fused")
    eager = make_runner(fp32_model, 8, 256, cuda_graphs=False, decode_variant="fused")
    graphs.capture_graphs()
    gen = random.Random(3)
    for batch in (4, 3):
        prompts = [rand_ids(gen, fp32_model.facts.vocab_size, 40) for _ in range(batch)]
        toks = {r: r.prefill([(s, p, 0) for s, p in enumerate(prompts)]) for r in (graphs, eager)}
        assert toks[graphs] == toks[eager]
        for step in range(8):
            pos = [40 + step] * batch
            toks = {r: r.decode_step(list(range(batch)), toks[r], pos) for r in (graphs, eager)}
            assert toks[graphs] == toks[eager], f"batch {batch}, step {step}"


def test_graph_capture_reports_its_time_and_pool_memory(fp32_model):
    """What a run records of its decode graphs: how many, the seconds their capture took, and
    the bytes of their shared memory pool (segments of that pool in the allocator's snapshot)."""
    runner = make_runner(fp32_model, 8, 256, cuda_graphs=True, decode_variant="fused")
    assert runner.num_graphs == 0 and runner.graph_pool_bytes() is None
    buckets = runner.capture_graphs()
    assert runner.num_graphs == len(buckets) > 0 and runner.graph_capture_s > 0
    pool = runner.graph_pool_bytes()
    assert pool is None or pool > 0, pool
    again = runner.graph_capture_s
    runner.capture_graphs()  # nothing new to capture: no time added
    assert runner.graph_capture_s == again


# bf16 logits of two forwards that differ only in rounding (see the decode-path test below)
BF16_LOGITS_REL_RMS, BF16_ARGMAX_AGREEMENT = 0.15, 0.5


def compare(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    diff = (x - y).float()
    return {"rel_rms": (diff.pow(2).mean().sqrt() / y.float().pow(2).mean().sqrt()).item(),
            "argmax_agreement": (x.argmax(-1) == y.argmax(-1)).float().mean().item()}


def prefilled(runner, prompts) -> list[int]:
    """Each prompt prefilled into slot 0, 1, ...; their first tokens."""
    return runner.prefill([(s, p, 0) for s, p in enumerate(prompts)])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_decode_path_matches_the_torch_reference_runner(fp32_model, bf16_model, dtype):
    """One decode step of 16 sequences from the same KV pool and tokens: Triton kernels (fused
    RoPE/KV write/attention) vs the PyTorch reference runner, same weights. fp32 agrees to
    rounding (relative RMS <= 1e-4, every argmax). bf16 differs wherever rounding does (split-K
    sums partials in another order; a 1-ulp change carried through the layers adds up to a few
    percent of the logits' RMS; the recorded H200 run: 0.05); a wrong kernel (slot, length, head
    group, scale) gives unrelated logits, relative RMS ~1.4 and argmax agreement ~0. So bf16
    passes at relative RMS <= 0.15 and argmax agreement >= 0.5 (random-weight logits are nearly
    flat: near-ties flip some)."""
    loaded = fp32_model if dtype == "float32" else bf16_model
    gen = random.Random(4)
    prompts = [rand_ids(gen, loaded.facts.vocab_size, 64 + 3 * i) for i in range(16)]
    reference = make_runner(loaded, 16, 256, kernels="torch", cuda_graphs=False)
    triton = make_runner(loaded, 16, 256, kv=reference.kv, kernels="triton")
    first, slots, pos = prefilled(reference, prompts), list(range(16)), [len(p) for p in prompts]
    got = compare(triton.decode_logits(slots, first, pos), reference.decode_logits(slots, first, pos))
    rel, agree = (1e-4, 1.0) if dtype == "float32" else (BF16_LOGITS_REL_RMS, BF16_ARGMAX_AGREEMENT)
    assert got["rel_rms"] <= rel and got["argmax_agreement"] >= agree, got


def test_the_gemv_path_matches_cublas(bf16_model):
    """The opt-in Triton GEMV (decode batches of <= 4) against cuBLAS, same KV and tokens: the
    logits of one step agree to bf16 rounding (the decode-path bound above)."""
    gen = random.Random(5)
    prompts = [rand_ids(gen, bf16_model.facts.vocab_size, 50 + i) for i in range(4)]
    plain = make_runner(bf16_model, 4, 256)
    gemv = make_runner(bf16_model, 4, 256, kv=plain.kv, gemv=True)
    gemv.capture_graphs()  # tunes the GEMV configs first
    first, slots, pos = prefilled(plain, prompts), list(range(4)), [len(p) for p in prompts]
    got = compare(gemv.decode_logits(slots, first, pos), plain.decode_logits(slots, first, pos))
    assert got["rel_rms"] <= BF16_LOGITS_REL_RMS and got["argmax_agreement"] >= BF16_ARGMAX_AGREEMENT, got


def test_bf16_tokens_disagree_with_hf_only_at_near_ties(bf16_model):
    """bf16 greedy decoding against HF, teacher-forced on HF's own sequence: most argmaxes
    agree (>= 0.5; the recorded H200 run: 0.86), and where they do not, HF's own logit margin
    between its token and ours is a near-tie: within 32 bf16 ulps of its top logit (the
    recorded run's largest was 5; two bf16 implementations differ by up to ~11 ulps per logit,
    so a tie within twice that can break either way; a wrong engine picks tokens ~100 ulps down)."""
    runner = make_runner(bf16_model, 2, 256)
    gen = random.Random(6)
    agree = total = 0
    margins = []
    for i, p in enumerate([rand_ids(gen, bf16_model.facts.vocab_size, n) for n in (64, 77)]):
        seq = p + hf_greedy(bf16_model, p, 32)
        ours = runner.forward_logits([(i, seq, 0)])[len(p) - 1:].argmax(-1)
        with torch.no_grad():
            hf = bf16_model.model(torch.tensor([seq], device="cuda")).logits[0, len(p) - 1:].float()
        theirs = hf.argmax(-1)
        agree += int((ours == theirs).sum())
        total += ours.numel()
        for j in torch.nonzero(ours != theirs).flatten().tolist():
            top = hf[j, theirs[j]].item()
            ulp = 2.0 ** (math.floor(math.log2(max(abs(top), 1e-30))) - 7)
            margins.append((top - hf[j, ours[j]].item()) / ulp)
    assert agree / total >= 0.5, f"teacher-forced agreement {agree}/{total}"
    assert max(margins, default=0.0) <= 32, f"disagreements far from a tie (ulps): {sorted(margins)}"


def test_every_prefill_sdpa_backend_agrees_with_pytorchs_choice(bf16_model):
    """The prompt attention under each SDPA backend that runs here, against "auto": the
    logits of two 512-token prompts after every layer agree as bf16 forwards do (relative RMS
    <= BF16_LOGITS_REL_RMS, the bound of the bf16 decode-path check: rounding compounds over
    the layers, so one attention's 1e-2 does not apply to the model's logits; flash against
    cuDNN measured 0.025 on the H200) and pick the same top token for most rows; at least one
    backend besides auto runs on a CUDA GPU."""
    from splitlab.errors import ConfigError

    gen = random.Random(7)
    chunks = [(s, rand_ids(gen, bf16_model.facts.vocab_size, 512), 0) for s in range(2)]
    want = make_runner(bf16_model, 2, 600, cuda_graphs=False).forward_logits(chunks).float()
    ran = {}
    for backend in ("flash", "efficient", "cudnn"):
        try:
            got = make_runner(bf16_model, 2, 600, cuda_graphs=False, sdpa_backend=backend).forward_logits(chunks)
        except (RuntimeError, ConfigError) as exc:  # this backend does not take these inputs on this GPU
            ran[backend] = f"not here: {str(exc)[:80]}"
            continue
        diff = compare(got.float(), want)
        ran[backend] = diff["rel_rms"]
        assert ran[backend] <= BF16_LOGITS_REL_RMS and diff["argmax_agreement"] >= BF16_ARGMAX_AGREEMENT, (ran, diff)
    assert any(isinstance(v, float) for v in ran.values()), ran
