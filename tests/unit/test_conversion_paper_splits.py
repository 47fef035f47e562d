"""``--split paper`` readers against the real published lists that ship with the package
(``nnssl/data/paper_splits``, provenance in its PROVENANCE.md): counts, file order, id normalisation and disjoint
roles."""

from __future__ import annotations

import pytest

from dataset_conversion import acdc, amos, busi, flare22, la, pancreas, synapse
from dataset_conversion.errors import ConversionError
from dataset_conversion.options import SplitOptions
from dataset_conversion.published import find_splits_dir

SPLITS = find_splits_dir()


def roles(rules, **options):
    paper = rules.paper_split(SPLITS, SplitOptions(split="paper", **options))
    ids = {r: [rules.normalize_id(i) for i in getattr(paper, r)] for r in ("labeled", "unlabeled", "test", "val")}
    ids = {r: list(dict.fromkeys(v)) for r, v in ids.items()}
    flat = [i for v in ids.values() for i in v]
    assert len(flat) == len(set(flat)), "an id in two roles"
    return paper, ids


def test_acdc_ssl4mis_7_and_3_patients():
    paper, ids = roles(acdc.RULES)
    assert [len(ids[r]) for r in ("labeled", "unlabeled", "test", "val")] == [14, 126, 40, 20]
    assert ids["labeled"][:6] == ["patient099_ED", "patient099_ES", "patient038_ED", "patient038_ES",
                                  "patient050_ED", "patient050_ES"]
    assert {acdc.patient_of(i) for i in ids["labeled"]} == {"patient099", "patient038", "patient050", "patient100",
                                                            "patient058", "patient021", "patient049"}
    assert paper.labeled_fraction == pytest.approx(7 / 70) and paper.origin == "paper:SSL4MIS/acdc"
    _, three = roles(acdc.RULES, labeled_count=3, paper="bcp")
    assert len(three["labeled"]) == 6


def test_la_uamt_16_and_sdcl_8():
    _, ids = roles(la.RULES)
    assert [len(ids[r]) for r in ("labeled", "unlabeled", "test")] == [16, 64, 20]
    assert ids["labeled"][0] == "06SR5RBREL16DQ6M8LWS"
    _, sdcl = roles(la.RULES, paper="sdcl")
    assert len(sdcl["labeled"]) == 8 and sdcl["labeled"] == ids["labeled"][:8]


def test_amos_dhc_fractions_and_guidednet():
    rules = amos.rules("all")
    paper, ids = roles(rules, labeled_fraction=0.05)
    assert [len(ids[r]) for r in ("labeled", "unlabeled", "test", "val")] == [10, 206, 120, 24]
    assert paper.labeled_fraction == 0.05 and any(not amos.is_ct(i) for i in ids["labeled"])
    _, two = roles(rules, labeled_count=4)
    assert len(two["labeled"]) == 4
    with pytest.raises(ConversionError, match="20 % lists"):
        roles(rules, labeled_fraction=0.2)
    _, guided = roles(amos.rules("ct"), paper="guidednet")
    assert [len(guided[r]) for r in ("labeled", "unlabeled", "test", "val")] == [18, 162, 60, 60]
    assert all(amos.is_ct(i) for v in guided.values() for i in v) and "\r" not in "".join(guided["labeled"])


def test_busi_mgcc_folds():
    paper, ids = roles(busi.RULES, paper="mgcc2")
    assert [len(ids[r]) for r in ("labeled", "unlabeled", "test")] == [226, 226, 195]
    assert ids["labeled"][0] == "benign_346" and paper.origin == "paper:MGCC/busi/fold2"


def test_synapse_genericssl_and_dhc():
    _, ids = roles(synapse.RULES)
    assert ids["labeled"] == ["synapse_0009", "synapse_0021", "synapse_0025", "synapse_0034"]
    assert [len(ids[r]) for r in ("unlabeled", "test", "val")] == [16, 6, 4]
    _, dhc = roles(synapse.RULES, paper="dhc", labeled_fraction=0.4)
    assert len(dhc["labeled"]) == 8 and dhc["test"] == [f"synapse_{i}" for i in ("0004", "0007", "0010", "0033",
                                                                                   "0035", "0036")]
    with pytest.raises(ConversionError, match="published labeled fractions"):
        roles(synapse.RULES, labeled_fraction=0.1)


def test_pancreas_sdcl_and_bcp_agree():
    _, sdcl = roles(pancreas.RULES)
    _, bcp = roles(pancreas.RULES, paper="bcp")
    assert [len(sdcl[r]) for r in ("labeled", "unlabeled", "test")] == [12, 50, 18]
    assert sdcl == bcp and "pancreas_0025" not in sdcl["unlabeled"] and sdcl["labeled"][0] == "pancreas_0001"


def test_flare22_paper_split_is_refused_with_the_reason():
    with pytest.raises(ConversionError, match="renamed ids"):
        flare22.RULES.paper_split(SPLITS, SplitOptions(split="paper"))
