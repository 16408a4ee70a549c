"""Unit tier: each metric against a hand computation on small tensors."""

import math

import numpy as np
import pytest
import torch

from corevital.kernels import fused, native, summaries


def test_logits_entropy_of_uniform_is_log_v_and_of_one_hot_is_zero():
    v = 7
    uniform = torch.zeros(v)
    one_hot = torch.full((v,), -1e4)
    one_hot[3] = 10.0
    logits = torch.stack([uniform, one_hot])
    stats, top_p, top_ids, log_norm, *_ = summaries.logits_summary(logits)  # (2, 3)
    assert stats[0, 0].item() == pytest.approx(math.log(v), abs=1e-6)
    assert stats[1, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert stats[0, 1].item() == pytest.approx(1 / v, abs=1e-7)
    assert stats[0, 2].item() == pytest.approx(0.0, abs=1e-7)  # uniform: no margin
    assert stats[1, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert stats[1, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert top_ids[1, 0].item() == 3
    torch.testing.assert_close(logits - log_norm[:, None], torch.log_softmax(logits, -1))


def test_logits_summary_matches_hand_computation():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, 3.0])
    p = np.exp(logits.numpy().astype(np.float64))
    p /= p.sum()
    stats, top_p, top_ids, *_ = summaries.logits_summary(logits)
    srt = np.sort(p)[::-1]
    assert stats[0].item() == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    assert stats[1].item() == pytest.approx(srt[0], rel=1e-6)
    assert stats[2].item() == pytest.approx(srt[0] - srt[1], rel=1e-6)
    assert top_ids.tolist() == list(np.argsort(-p)[:5])
    np.testing.assert_allclose(top_p.numpy(), srt[:5], rtol=1e-6)


def test_logits_summary_is_vectorised_over_leading_dims():
    logits = torch.randn(2, 3, 11)
    stats, top_p, top_ids, log_norm, *_ = summaries.logits_summary(logits)
    assert (
        stats.shape == (2, 3, 3)
        and top_p.shape == (2, 3, 5)
        and top_ids.shape == (2, 3, 5)
        and log_norm.shape == (2, 3)
    )
    one, *_ = summaries.logits_summary(logits[1, 2])
    torch.testing.assert_close(stats[1, 2], one)


def test_logits_summary_handles_minus_inf_and_leaves_logits_unchanged():
    logits = torch.randn(5, 9)
    logits[0, 2] = float("-inf")  # a token the model rules out contributes 0, not NaN
    logits[3, :4] = -200.0  # far below the max: weights that underflow exp
    targets = torch.tensor([[2], [0], [8], [4], [1]])  # (5, 1), including the ruled-out token
    p = torch.softmax(logits.double(), -1)
    expected = -torch.where(p > 0, p * p.log(), 0.0).sum(-1)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets)
    before = logits.clone()
    out = summaries.logits_summary(logits, targets=targets)
    assert torch.equal(logits, before)  # the raw logits are left as they were
    assert torch.isfinite(out.stats).all()
    torch.testing.assert_close(out.stats[:, 0].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.picked[1:].double(), logp[1:], rtol=1e-6, atol=1e-6)
    assert -torch.inf < out.picked[0, 0] < -1e30  # ruled out: far below any real log-prob, not NaN


@pytest.mark.parametrize(
    "v,vocab_slice,softcap", [(5120, 1024, None), (5000, 1024, None), (5000, 700, 30.0), (300, 7, None)]
)
def test_linear_logits_summary_equals_row_major(v, vocab_slice, softcap):
    """Logits made and summarised slice by slice (fused kernel): the max in the first slice,
    in the last, partial one (earlier sums rescaled), tokens far below it, a bias, soft-capping."""
    torch.manual_seed(v + vocab_slice)
    hidden, weight, bias = torch.randn(6, 16) * 2, torch.randn(v, 16), torch.randn(v)
    bias[17], bias[-1], bias[:50] = 40.0, 60.0, -300.0
    hidden[0] = 0.0  # position 0: the bias alone, whose max (40) is in the first slice
    targets = torch.tensor([[2], [17], [v - 1], [0], [5], [v // 2]])
    logits = hidden @ weight.T + bias  # (6, v)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    row = summaries.logits_summary(logits, targets)
    sliced = summaries.linear_logits_summary(hidden, weight, bias, targets, softcap, vocab_slice)
    for name in ("stats", "top_p", "log_norm", "picked"):
        torch.testing.assert_close(getattr(sliced, name), getattr(row, name), rtol=2e-5, atol=2e-6, msg=name)
    assert torch.equal(sliced.top_ids, row.top_ids)
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(
        sliced.stats[:, 0].double(), -torch.where(p > 0, p * p.log(), 0.0).sum(-1), rtol=1e-5, atol=1e-6
    )


def _summary_by_hand(p: np.ndarray, first: int, q_offset: int, prompt_keys: int) -> np.ndarray:
    """float64 weights (heads, q, k) of one sequence -> (q, 6): entropy mean and min over heads,
    largest weight, mean weights on the sink column, the previous key, the prompt's keys."""
    out = np.zeros((p.shape[1], 6))
    for i in range(p.shape[1]):
        ent = [-sum(x * math.log(x) for x in p[h, i] if x > 0) for h in range(p.shape[0])]
        prev = q_offset + i - 1
        out[i] = [
            np.mean(ent),
            min(ent),
            p[:, i].max(),
            np.mean(p[:, i, first]) if 0 <= first < p.shape[2] else 0.0,
            np.mean(p[:, i, prev]) if prev >= 0 else np.nan,
            p[:, i, :prompt_keys].sum(-1).mean(),
        ]
    return out


def test_fused_attention_summary_against_float64():
    """The kernel alone, over leads (layers, batch): causal rows from key column 4 (query i
    sees keys 0..4 + i), a padding mask on one sequence, weights left in place (hidden keys
    exactly 0), statistics and masses against float64 sums written out."""
    torch.manual_seed(5)
    layers, b, h, q, k = 2, 2, 4, 3, 7
    scores = torch.randn(layers, b, h, q, k) * 4
    visible = (torch.arange(k)[None, :] <= torch.arange(q)[:, None] + 4).expand(b, 1, q, k).clone()  # (b, 1, q, k)
    visible[1, ..., :2] = False  # sequence 1 is left-padded by 2: its first real key is column 2
    first = torch.tensor([0, 2])
    p = torch.softmax(scores.double().masked_fill(~visible, -torch.inf), -1)  # (layers, b, h, q, k)
    for mask, causal in ((visible, False), (None, True)):
        if mask is None:  # plain causal, no padding
            visible[1, ..., :2] = True
            p = torch.softmax(scores.double().masked_fill(~visible, -torch.inf), -1)
        s = scores.clone()
        out = fused.attention_summary(s, causal, 4, mask, first, 5)  # (layers, b, q, 6)
        torch.testing.assert_close(s.double(), p, rtol=1e-6, atol=1e-7)
        assert (s.masked_select(~visible.expand_as(s)) == 0).all()
        for li in range(layers):
            for bi in range(b):
                np.testing.assert_allclose(
                    out[li, bi].numpy(), _summary_by_hand(p[li, bi].numpy(), int(first[bi]), 4, 5), rtol=1e-5, atol=1e-6
                )


def test_fused_attention_decode_reads_layers_in_place():
    """One decode step of three layers read in place: grouped heads, queries as a model makes
    them (a transposed view), a scaling per layer, a left-padded sequence, a sink per row."""
    torch.manual_seed(6)
    layers, b, h, kv, k, d = 3, 2, 4, 2, 6, 8
    queries = [torch.randn(b, 1, h, d).transpose(1, 2) for _ in range(layers)]  # (b, h, 1, d), as a model makes them
    keys = [torch.randn(b, kv, k, d) for _ in range(layers)]
    scales = [0.5, 0.25, 1.0]
    mask = torch.ones(b, 1, 1, k, dtype=torch.bool)
    mask[1, ..., :3] = False
    first = torch.tensor([0, 3])
    assert fused.decode_mask(mask, b, k) and not fused.decode_mask(mask.expand(b, 1, 2, k), b, k)
    out = fused.attention_decode(queries, keys, scales, mask, first, 4)  # (b, 1, layers, 6)
    for li in range(layers):
        scores = (
            torch.einsum(
                "bhd,bhkd->bhk", queries[li][:, :, 0].double(), keys[li].double().repeat_interleave(h // kv, dim=1)
            )
            * scales[li]
        )  # (b, h, k)
        p = torch.softmax(scores.masked_fill(~mask[:, 0], -torch.inf), -1)
        for bi in range(b):
            np.testing.assert_allclose(
                out[bi, 0, li].numpy(),
                _summary_by_hand(p[bi, :, None].numpy(), int(first[bi]), k - 1, 4)[0],
                rtol=1e-5,
                atol=1e-6,
            )


def test_fused_kernels_fall_back_to_torch_without_a_compiler(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("COREVITAL_CACHE_DIR", str(tmp_path))
    fused._library.cache_clear()
    native.library.cache_clear()
    try:
        assert not fused.available() and not summaries.fused_kernels(torch.device("cpu"))
        assert "C kernels of fused.c unavailable" in caplog.text
        assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library left behind
        stats = summaries.attention_stats(torch.zeros(1, 1, 1, 4), None, 3)
        assert stats[0, 0, 0].item() == pytest.approx(math.log(4))
    finally:
        fused._library.cache_clear()
        native.library.cache_clear()


@pytest.mark.parametrize("v", [5120, 5000, 300])  # whole blocks of 256, a partial last block, too few blocks
def test_top5_equals_torch_topk(v):
    torch.manual_seed(v)
    s = torch.randn(6, v) * 3
    s[1, 17] = 40.0  # one huge entry
    s[2, -3:] = torch.tensor([9.0, 9.5, 10.0])  # the best three in the partial last block
    s[3, 256:261] = 20.0 + torch.arange(5.0)  # all five in one block
    values, ids = summaries._top5(s)
    expected_values, expected_ids = s.topk(5, dim=-1)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
    assert torch.equal(ids, expected_ids)


@pytest.mark.usefixtures("kernels")
def test_hidden_summary_uses_population_std():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-5.0, 0.0, 0.0, 1.0]])
    d = torch.cat([torch.eye(4)[:, :2], torch.zeros(4, 6)], dim=1)  # project onto the first two coordinates
    before = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 0.0, 0.0, -1.0]])  # parallel, then opposite
    out = summaries.hidden_summary(h, d, before)
    x = h.numpy().astype(np.float64)
    np.testing.assert_allclose(out[:, -1], [1.0, -1.0], rtol=1e-6)  # cosine with the block's input, last
    np.testing.assert_allclose(out[:, 0], x.mean(1), rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], x.std(1, ddof=0), rtol=1e-6)  # 1.118..., not ddof=1's 1.29
    np.testing.assert_allclose(out[:, 2], np.linalg.norm(x, axis=1), rtol=1e-6)
    np.testing.assert_allclose(out[:, 3], [4.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(out[:, 4:6], x[:, :2], rtol=1e-6)
    assert (out[:, 6:12] == 0).all()
    assert out[0, 1].item() == pytest.approx(math.sqrt(1.25))


def test_fused_hidden_summary_of_consecutive_blocks_against_float64():
    """Three blocks read in place (each block's input is the output before it), rows of 37
    (not a whole number of vectors), one unknown input (NaN: its cosine is NaN), a NaN value
    (max |x| is NaN, as torch's amax), against float64 sums written out."""
    torch.manual_seed(7)
    states = [torch.randn(2, 3, 37) * (i + 1) + i for i in range(4)]  # input, then 3 block outputs: (b, q, hidden)
    states[0][1, 2] = float("nan")
    states[2][0, 0, 5] = float("nan")
    dirs = summaries.sketch_directions(37)
    out = fused.hidden_summary(states, dirs)  # (6, 3, 13)
    for layer in range(3):
        x, before = states[layer + 1].reshape(6, 37).double().numpy(), states[layer].reshape(6, 37).double().numpy()
        norm = np.linalg.norm(x, axis=1)
        expected = np.column_stack(
            [
                x.mean(1),
                x.std(1),
                norm,
                np.abs(x).max(1),
                x @ dirs.double().numpy(),
                (x * before).sum(1) / (norm * np.linalg.norm(before, axis=1)),
            ]
        )
        np.testing.assert_allclose(out[:, layer].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert out[5, 0, 12].isnan() and out[0, 1, 3].isnan() and not out[1, 1].isnan().any()


def test_sketch_directions_are_fixed_unit_vectors():
    d = summaries.sketch_directions(16)
    assert d.shape == (16, 8)
    np.testing.assert_allclose(d.norm(dim=0).numpy(), np.ones(8), rtol=1e-6)
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(16, 8, generator=g)
    torch.testing.assert_close(d, raw / raw.norm(dim=0, keepdim=True))
    torch.testing.assert_close(d, summaries.sketch_directions(16))


def _attention_by_hand(q, k, mask_row):
    """One head, one query: softmax over the visible keys, then entropy and max."""
    s = (k @ q) / math.sqrt(q.shape[0])
    s = s[mask_row]
    p = np.exp(s - s.max())
    p /= p.sum()
    return -(p * np.log(p)).sum(), p.max()


def _by_hand(query, key, mask):
    """(b, q, 3) from explicit loops over batch, query rows and heads; head i reads key head i // groups."""
    b, h, q, d = query.shape
    groups = h // key.shape[1]
    out = np.zeros((b, q, 3))
    for bi in range(b):
        for qi in range(q):
            ents, maxes = zip(
                *(
                    _attention_by_hand(
                        query[bi, hi, qi].double().numpy(),
                        key[bi, hi // groups].double().numpy(),
                        mask[bi, 0, qi].numpy(),
                    )
                    for hi in range(h)
                )
            )
            out[bi, qi] = [np.mean(ents), np.min(ents), np.max(maxes)]
    return out


@pytest.mark.usefixtures("kernels")
def test_attention_summary_masks_keys_and_aggregates_heads():
    torch.manual_seed(0)
    b, h, q, k, d = 2, 3, 2, 5, 4
    query, key = torch.randn(b, h, q, d), torch.randn(b, h, k, d)
    mask = torch.ones(b, 1, q, k, dtype=torch.bool)
    mask[0, ..., 0] = False  # key 0 of sequence 0 is padding
    mask[:, :, 0, 4] = False  # query 0 may not see key 4
    out = summaries.attention_summary(query, key, mask, d**-0.5, q_offset=0)  # (b, q, 3)
    np.testing.assert_allclose(out.numpy(), _by_hand(query, key, mask), rtol=1e-5)


@pytest.mark.usefixtures("kernels")
def test_attention_summary_grouped_query_heads():
    torch.manual_seed(2)
    query, key = torch.randn(1, 6, 3, 4), torch.randn(1, 2, 3, 4)  # 6 query heads share 2 key heads
    mask = (torch.arange(3)[None, :] <= torch.arange(3)[:, None])[None, None]  # causal (1, 1, q, k)
    out = summaries.attention_summary(query, key, mask, 0.5, q_offset=0)
    np.testing.assert_allclose(out.numpy(), _by_hand(query, key, mask), rtol=1e-5)


@pytest.mark.usefixtures("kernels")
def test_attention_stats_vectorised_over_layers():
    torch.manual_seed(3)
    query, key = torch.randn(4, 2, 3, 1, 8), torch.randn(4, 2, 3, 6, 8)  # (layers, b, h, q=1, d)
    scalings = [0.1, 0.2, 0.3, 0.4]
    mask = torch.tensor([[True] * 6, [False, False, True, True, True, True]])[:, None, None, :]  # (b, 1, 1, k)
    scores = torch.stack([summaries.attention_scores(query[i], key[i], s) for i, s in enumerate(scalings)])
    batched = summaries.attention_stats(scores, mask, q_offset=5)  # (layers, b, 1, 3)
    for layer, s in enumerate(scalings):
        one = summaries.attention_summary(query[layer], key[layer], mask, s, q_offset=5)
        torch.testing.assert_close(batched[layer], one)
        np.testing.assert_allclose(one.numpy(), _by_hand(query[layer] * s / 8**-0.5, key[layer], mask), rtol=1e-5)


@pytest.mark.usefixtures("kernels")
def test_attention_with_no_mask_is_causal_from_offset():
    torch.manual_seed(1)
    query, key = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4)
    causal = summaries.attention_summary(query, key, None, 0.5, q_offset=2)
    explicit = torch.arange(5)[None, :] <= torch.arange(3)[:, None] + 2  # (q, k)
    torch.testing.assert_close(causal, summaries.attention_summary(query, key, explicit, 0.5, q_offset=2))
    additive = torch.where(explicit, 0.0, torch.finfo(torch.float32).min)
    torch.testing.assert_close(causal, summaries.attention_summary(query, key, additive, 0.5, q_offset=2))
    first_row_only = summaries.attention_summary(query[:, :, :1], key[:, :, :3], None, 0.5, q_offset=2)
    torch.testing.assert_close(causal[:, :1], first_row_only)  # query 0 sees keys 0..2 only


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("masking", ["causal", "causal-bias", "padding", "additive"])
def test_attention_statistics_under_every_kind_of_mask_equal_float64(masking):
    """Grouped heads, a causal offset (a block of query rows late in the sequence) and padding:
    the statistics from masked scores (a boolean or additive mask, a causal mask the kernel
    applies, or one added by the score product) against float64 weights written out."""
    torch.manual_seed(4)
    b, h, kv, q, k, d = 2, 6, 2, 3, 7, 4
    query, key = torch.randn(b, h, q, d), torch.randn(b, kv, k, d)
    visible = torch.arange(k)[None, :] <= torch.arange(q)[:, None] + (k - q)  # (q, k): query i sits at key k - q + i
    visible = visible.expand(b, 1, q, k).clone()
    if masking in ("padding", "additive"):
        visible[1, ..., :2] = False  # sequence 1 is left-padded by 2
    mask = {
        "causal": None,
        "causal-bias": None,
        "padding": visible,
        "additive": torch.where(visible, 0.0, torch.finfo(torch.float32).min),
    }[masking]
    scores = summaries.attention_scores(query, key, 0.5)
    if masking == "causal-bias":  # the mask added by the score product itself
        biased = summaries.attention_scores(query, key, 0.5, bias=summaries.causal_bias(h // kv, q, k, k - q))
        torch.testing.assert_close(biased.masked_fill(~visible, 0.0), scores.masked_fill(~visible, 0.0))
        assert (biased.masked_select(~visible) < -1e38).all()
        stats = summaries.attention_stats(biased, None, q_offset=k - q, masked=True)
    else:
        stats = summaries.attention_stats(scores.clone(), mask, q_offset=k - q)  # (b, q, 3)
    s64 = torch.einsum("bhqd,bhkd->bhqk", query.double(), key.double().repeat_interleave(h // kv, dim=1)) * 0.5
    p = torch.softmax(s64.masked_fill(~visible, -torch.inf), -1)  # (b, h, q, k)
    ent = -torch.special.xlogy(p, p).sum(-1)  # (b, h, q)
    expected = torch.stack([ent.mean(1), ent.amin(1), p.amax(dim=(1, 3))], dim=-1)  # (b, q, 3)
    np.testing.assert_allclose(stats.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("kernels")
def test_uniform_attention_has_entropy_log_k():
    query, key = torch.zeros(1, 2, 1, 4), torch.randn(1, 2, 6, 4)
    out = summaries.attention_summary(query, key, None, 1.0, q_offset=5)
    assert out[0, 0, 0].item() == pytest.approx(math.log(6), rel=1e-6)
    assert out[0, 0, 2].item() == pytest.approx(1 / 6, rel=1e-6)


@pytest.mark.usefixtures("kernels")
def test_fully_masked_query_stays_finite():
    """A padding query sees no key; its row is never written, but must not poison the others."""
    out = summaries.attention_summary(
        torch.randn(1, 1, 1, 2), torch.randn(1, 1, 3, 2), torch.zeros(1, 1, 1, 3, dtype=torch.bool), 1.0, 0
    )
    assert torch.isfinite(out).all()


def test_attention_masses_by_hand():
    """Sink, previous-key and prompt masses of two heads' weights, against sums written out."""
    p = torch.tensor(
        [
            [
                [
                    [0.0, 0.5, 0.3, 0.2],  # query 0 of head 0: first real key is column 1 (column 0 is padding)
                    [0.0, 0.1, 0.1, 0.8],
                ],
                [[0.0, 0.2, 0.2, 0.6], [0.0, 0.4, 0.4, 0.2]],
            ]
        ]
    )  # (b=1, h=2, q=2, k=4); queries at key columns 2 and 3
    out = summaries.attention_masses(p, torch.tensor([1]).view(1, 1, 1, 1), q_offset=2, prompt_keys=3)  # (1, 2, 3)
    expected = [
        [(0.5 + 0.2) / 2, (0.5 + 0.2) / 2, (0.8 + 0.4) / 2],  # sink: column 1; prev of query at 2: column 1
        [(0.1 + 0.4) / 2, (0.1 + 0.4) / 2, (0.2 + 0.8) / 2],
    ]  # prev of query at 3: column 2; prompt: columns < 3
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-6)
    gone = summaries.attention_masses(p, torch.tensor([-1]).view(1, 1, 1, 1), q_offset=0, prompt_keys=0)
    assert (gone[0, :, 0] == 0).all() and gone[0, 0, 1].isnan() and (gone[0, :, 2] == 0).all()


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_token_rank_by_hand_and_in_vocabulary_slices(softcap):
    """1 + the count of strictly larger raw logits, from whole rows and from the sliced fused path."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(50, 8, generator=g)
    targets = torch.randint(0, 50, (6, 1), generator=g)
    logits = hidden.double() @ weight.double().T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    expected = 1 + (logits > logits.gather(-1, targets)).sum(-1)
    assert torch.equal(summaries.logits_summary(logits.float(), targets).rank, expected)
    if fused.available():
        got = summaries.linear_logits_summary(hidden, weight, None, targets, softcap, vocab_slice=7).rank
        assert torch.equal(got, expected)
