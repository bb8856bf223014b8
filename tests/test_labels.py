import pytest

from ichscan.labels import LABELS, merge_thresholds, parse_thresholds


def test_label_order_is_rsna():
    assert LABELS == ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


def test_single_value_sets_all():
    assert parse_thresholds("0.4") == {label: 0.4 for label in LABELS}


def test_named_values_set_some():
    assert parse_thresholds("any=0.3, subdural=0.45") == {"any": 0.3, "subdural": 0.45}


@pytest.mark.parametrize("spec", ["", "abc", "1.5", "-0.1", "bleed=0.3", "any=x", "any"])
def test_bad_thresholds_raise(spec):
    with pytest.raises(ValueError):
        parse_thresholds(spec)


def test_stray_comma_is_named():
    with pytest.raises(ValueError, match="empty item in threshold 'any=0.3,,'"):
        parse_thresholds("any=0.3,,")


def test_precedence_cli_over_checkpoint_over_default():
    merged = merge_thresholds({"any": 0.2, "epidural": 0.7}, {"any": 0.3})
    assert merged["any"] == 0.3
    assert merged["epidural"] == 0.7
    assert merged["subdural"] == 0.5
