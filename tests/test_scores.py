"""Pure score math against hand-computed values."""

import torch

from hf_ches.scores import ches, edit_distance, last_hidden_ip, ln_ches


def test_ches_by_hand():
    s_c = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    s_r = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    # <S+,S-> - |S+|^2: row0 5 - 5 = 0 ; row1 (1 - 2) - (0.25 + 1) = -2.25
    assert ches(s_c, s_r).tolist() == [0.0, -2.25]
    assert ches(s_c, s_r).dtype == torch.float64


def test_ln_ches_is_mean_form():
    g = torch.Generator().manual_seed(0)
    s_c, s_r = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    n_c, n_r = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([5, 4, 3, 2, 1])
    m_c, m_r = s_c.double() / n_c[:, None], s_r.double() / n_r[:, None]
    expected = (m_c * (m_r - m_c)).sum(-1)  # <m+, m- - m+>
    assert torch.allclose(ln_ches(s_c, s_r, n_c, n_r), expected, rtol=0, atol=1e-12)


def test_identical_completions_score_zero():
    s = torch.randn(3, 4)
    assert torch.allclose(ches(s, s), torch.zeros(3, dtype=torch.float64), atol=1e-5)


def test_last_hidden_ip():
    assert last_hidden_ip(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])).tolist() == [11.0]


def naive_levenshtein(a, b):
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def test_edit_distance_matches_naive_dp():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        a = torch.randint(0, 4, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist()
        b = torch.randint(0, 4, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist()
        expected = naive_levenshtein(a, b) / max(len(a), len(b), 1)
        assert abs(edit_distance(a, b) - expected) < 1e-12, (a, b)
        big = [150_000 + t * 70_000 for t in a], [150_000 + t * 70_000 for t in b]  # ids of a large vocabulary
        assert edit_distance(*big) == edit_distance(a, b)
