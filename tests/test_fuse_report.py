"""torch_ext/fuse/report.py: the report says each pair fused, each Linear left alone and why, and
the forwards rewritten."""

import fusedlinear
from conftest import BertLayer


def test_report_says_what_it_did():
    _, report = fusedlinear.fuse(BertLayer(), report=True)
    text = str(report)
    assert "fused 1 Linear+activation pair(s), left 1 nn.Linear alone" in text
    assert "intermediate.dense + gelu" in text and "output.dense: no activation after it" in text
    assert fusedlinear.fuse(BertLayer()).__class__ is BertLayer  # report=False: just the model
