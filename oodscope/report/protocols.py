"""The evaluation protocols' sections of ``report.html`` (:mod:`oodscope.protocols`, ``oodscope bench
--protocol NAME``): one section per protocol that was run, anchor ``#protocol-NAME``, with a sentence stating the
construction, a sortable table of its records (the numbers of ``results.json``) and, where one helps, an inline
SVG figure (:func:`oodscope.report.svg.xy_svg`).

Each protocol has one small renderer here, ``records -> section`` (:func:`protocol_section`), registered in
:data:`RENDERERS`; a new protocol copies a neighbour. A protocol without a renderer gets :func:`generic_section`:
every scalar field of its records as a column.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .html import _table, anchor, figure_item

Record = Mapping[str, Any]
Column = tuple[str, str]  # (record key, column header)
HIDDEN = ("setting", "group")  # the same in every record of a protocol: said by the section's title instead


# -- building blocks ------------------------------------------------------------------------------------------------
def records_table(records: Sequence[Record], columns: Sequence[Column]) -> dict[str, Any]:
    """A sortable table for the template (:func:`oodscope.report.html._table`): one row per record, the given
    columns; booleans as yes/no, floats with two decimals, missing or non-finite as an en dash."""
    rows = [{key: ("yes" if value else "no") if isinstance(value, bool) else value
             for key, value in record.items()} for record in records]
    return _table(rows, [key for key, _ in columns], [header for _, header in columns])


def generic_columns(records: Sequence[Record]) -> list[Column]:
    """Every field holding a number, a string or nothing, in first-seen order, but :data:`HIDDEN`."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in HIDDEN and (value is None or isinstance(value, (str, int, float, np.number))):
                keys.setdefault(key)
    return [(key, key.replace("_", " ")) for key in keys]


def table_item(table: Mapping[str, Any], table_id: str, caption: str = "") -> dict[str, Any]:
    """One table of a section: the table, its HTML id and a caption above it."""
    return {"table": table, "id": table_id, "caption": caption}


def protocol_section(name: str, title: str, construction: str, tables: Sequence[Mapping[str, Any]],
                     figures: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """A protocol's section for the template: title, construction sentence, tables (:func:`table_item`) and
    figures (:func:`oodscope.report.html.figure_item`)."""
    return {"name": name, "anchor": anchor(name), "title": title, "construction": construction,
            "tables": list(tables), "figures": list(figures)}


def _ids(name: str) -> str:
    return f"protocol-{anchor(name)}-table"


def _first(records: Sequence[Record]) -> Record:
    return records[0] if records else {}


# -- one renderer per protocol ------------------------------------------------------------------------------------
def failure_section(records: Sequence[Record]) -> dict[str, Any]:
    first = _first(records)
    shifted = first.get("error_rate_shifted")
    construction = (
        f"Pool {first.get('dataset')}: a sample should be rejected when the classifier gets it wrong (clean or "
        "covariate-shifted ID test) or it is semantic OOD, and accepted otherwise; "
        f"{first.get('reject_share', float('nan')):.1f} % of the pool should be rejected (error on the clean ID "
        f"test {first.get('error_rate_clean', float('nan')):.1f} %"
        + (f", on its shifted copy {shifted:.1f} %)." if shifted is not None else ").")
        + " AUROC for the target \"should reject\" (higher is better); AURC and E-AURC (risk = share of the "
        "accepted samples that should have been rejected) and the SCOD risk (c_fn = 0.75) are lower-is-better, "
        "all in percent (oodscope.metrics.failure_metrics).")
    columns = [("detector", "detector"), ("auroc", "AUROC"), ("aurc", "AURC"), ("eaurc", "E-AURC"),
               ("scod_auc_rc", "SCOD AUC-RC"), ("reject_share", "should reject [%]")]
    rows = sorted(records, key=lambda r: r["aurc"])
    return protocol_section("failure", "Failure detection", construction,
                            [table_item(records_table(rows, columns), _ids("failure"))])


def unit_tests_section(records: Sequence[Record]) -> dict[str, Any]:
    bar = _first(records).get("bar", 90.0)
    tests = list(dict.fromkeys(r["dataset"] for r in records))
    construction = (
        f"Synthetic OOD sets every reasonable detector should flag ({', '.join(tests)}; seeded, at the ID image "
        f"size; oodscope.protocols.unit_tests states each construction). AUROC of ID test vs each set, in percent; "
        f"a detector passes a test at AUROC >= {bar:g}.")
    columns = [("detector", "detector"), ("dataset", "unit test"), ("auroc", "AUROC"), ("fpr95", "FPR@95"),
               ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"), ("passed", "passed")]
    share = [{"test": test, "share": 100.0 * float(np.mean([r["passed"] for r in records if r["dataset"] == test])),
              "detectors": sum(r["dataset"] == test for r in records)} for test in tests]
    return protocol_section("unit-tests", "Synthetic OOD unit tests", construction, [
        table_item(records_table(share, [("test", "unit test"), ("share", f"share passing [%] (AUROC >= {bar:g})"),
                                         ("detectors", "detectors")]),
                   _ids("unit-tests") + "-share", "Share of the detectors passing each test:"),
        table_item(records_table(records, columns), _ids("unit-tests"), "Every detector on every test:")])


def scaling_figure(records: Sequence[Record]) -> dict[str, str]:
    """AUROC (clean vs scaled ID test) against ``alpha`` on a log axis, one line per detector."""
    from .svg import xy_svg

    detectors = list(dict.fromkeys(r["detector"] for r in records))
    series = {d: ([r["alpha"] for r in records if r["detector"] == d],
                  [r["auroc"] for r in records if r["detector"] == d]) for d in detectors}
    svg = xy_svg(series, title="AUROC of clean vs scaled ID test", xlabel="alpha (model input x alpha, log scale)",
                 ylabel="AUROC [%]", log_x=True, ylim=(0.0, 100.0), reference_y=50.0)
    return figure_item(svg, "scaling: AUROC against alpha, one line per detector",
                       "AUROC of the clean ID test vs the scaled images against alpha (log axis), one line per "
                       "detector; the dashed line is 50 (blind), below it the scaled images look more ID than ID.")


def scaling_section(records: Sequence[Record]) -> dict[str, Any]:
    from ..protocols.scaling import N_IMAGES

    alphas = list(dict.fromkeys(r["alpha"] for r in records))
    warned = sum(int(r.get("saturation_warnings") or 0) for r in records)
    construction = (
        f"The model input (after preprocessing) of up to {N_IMAGES} seeded ID test images is multiplied by alpha in "
        f"{{{', '.join(f'{a:g}' for a in alphas)}}}; AUROC of the clean ID test vs the scaled images (50: blind; "
        "below 50: the scaled images look more ID than ID), flagged = % of the scaled images flagged at the "
        "threshold keeping 95 % of the clean ID test, mean MSP = the classifier's mean max-softmax on them. "
        f"Saturation warnings (rows beyond 1e6 times the training magnitude) counted per detector and alpha: "
        f"{warned} in all.")
    columns = [("detector", "detector"), ("alpha", "alpha"), ("auroc", "AUROC"), ("flagged", "flagged [%]"),
               ("mean_msp", "mean MSP [%]"), ("saturation_warnings", "saturation warnings")]
    detectors = list(dict.fromkeys(r["detector"] for r in records))
    rows = [{**r, "alpha": f"{r['alpha']:g}"}
            for r in sorted(records, key=lambda r: (detectors.index(r["detector"]), r["alpha"]))]
    return protocol_section("scaling", "Inputs scaled far from the data", construction,
                            [table_item(records_table(rows, columns), _ids("scaling"))], [scaling_figure(records)])


def label_noise_section(records: Sequence[Record]) -> dict[str, Any]:
    first = _first(records)
    groups = sorted({key[6:] for r in records for key in r if key.startswith("auroc_")})
    construction = (
        "The classifier fine-tuned on the ID training set with symmetric and class-dependent label noise (seeded; "
        f"{first.get('schedule')}), every detector refitted on each model's own training outputs; mean AUROC per "
        f"OOD group on {first.get('n_per_set')} images per set, and its change against the clean-label model.")
    columns = [("detector", "detector"), ("dataset", "labels"), ("noisy_share", "noisy labels [%]"),
               ("id_accuracy", "ID accuracy [%]"), *[(f"auroc_{g}", f"{g} AUROC") for g in groups],
               *[(f"delta_{g}", f"{g} change") for g in groups], ("train_s", "training [s]")]
    return protocol_section("label-noise", "Label-noise robustness", construction,
                            [table_item(records_table(records, columns), _ids("label-noise"))])


def open_set_section(records: Sequence[Record]) -> dict[str, Any]:
    first = _first(records)
    construction = (
        f"Open-set recognition on {first.get('splits')} class splits: a classifier trained on the known classes "
        f"only ({first.get('schedule')}), its unknown-class test images as OOD; closed-set accuracy, AUROC known vs "
        "unknown and OSCR (Dhamija et al. 2018), in percent.")
    columns = [("detector", "detector"), ("dataset", "split"), ("known", "known classes"),
               ("accuracy", "closed-set accuracy"), ("auroc", "AUROC"), ("oscr", "OSCR"),
               ("train_s", "training [s]")]
    rows = [{**r, "known": " ".join(map(str, r.get("known", ())))} for r in records]
    return protocol_section("open-set", "Open-set recognition", construction,
                            [table_item(records_table(rows, columns), _ids("open-set"))])


def correlation_figure(models: Sequence[Record]) -> dict[str, str] | None:
    """ID accuracy against AUROC per model, one colour per detector and OOD group (a scatter plot)."""
    from .svg import xy_svg

    keys = [key for key in (models[0] if models else {}) if key.endswith(" auroc")]
    if not keys:
        return None
    series = {key[:-len(" auroc")]: ([m["id_accuracy"] for m in models], [m[key] for m in models]) for key in keys}
    svg = xy_svg(series, title="ID accuracy vs OOD AUROC, one point per model", xlabel="ID accuracy [%]",
                 ylabel="AUROC [%]", lines=False)
    return figure_item(svg, "correlation: ID accuracy against AUROC per model",
                       "Each model's ID accuracy against its mean AUROC per detector and OOD group.")


def correlation_section(records: Sequence[Record]) -> dict[str, Any]:
    table = [r for r in records if r.get("setting") == "correlation"]
    models = [r for r in records if r.get("setting") == "correlation-models"]
    first = _first(table)
    construction = (
        f"The benchmark's model and the --ensemble models ({', '.join(m['dataset'] for m in models)}), each with "
        f"every detector fitted on its own training outputs and {first.get('per_set')} images per test set; per "
        "detector and OOD group, the Spearman and Kendall rank correlations (two-sided p-values) of ID accuracy "
        "with the group's mean AUROC over the models.")
    columns = [("detector", "detector"), ("group", "OOD group"), ("n", "models"), ("spearman", "Spearman"),
               ("spearman_p", "p"), ("kendall", "Kendall"), ("kendall_p", "p")]
    model_columns = [("dataset", "model"), ("id_accuracy", "ID accuracy [%]")] + [
        (key, key) for key in (models[0] if models else {}) if key.endswith(" auroc")]
    figure = correlation_figure(models)
    return protocol_section("correlation", "ID accuracy vs OOD AUROC across models", construction, [
        table_item(records_table(table, columns), _ids("correlation")),
        table_item(records_table(models, model_columns), _ids("correlation") + "-models", "The models:")],
        [figure] if figure else [])


def density_section(records: Sequence[Record]) -> dict[str, Any]:
    first = _first(records)
    pairs = [r for r in records if r.get("metric_pair")]
    by_detector = [r for r in records if r.get("metric")]
    metrics = str(first.get("density_metrics", "")).replace(",", ", ")
    built = [f"{key.split('_')[0]}: {first[key]}." for key in ("holdout_construction", "privacy_construction")
             if first.get(key)]
    construction = " ".join([
        f"Per-example prototypicality metrics ({metrics}; higher = more prototypical) on {first.get('n_train')} ID "
        f"training and {first.get('n_test')} ID test images"
        + (f", ensemble {first['ensemble']}." if first.get("ensemble") else "."),
        "Spearman correlation of the metrics with each other on train (they should agree) and of each detector's "
        "OOD score with each metric on ID test (negative = the score tracks density).",
        *built, f"Not computed: {first.get('not_computed')}."])
    return protocol_section("density", "Distribution density, tails and outliers", construction, [
        table_item(records_table(pairs, [("metric_pair", "metrics"), ("spearman", "Spearman")]),
                   _ids("density") + "-pairs", "The metrics against each other (ID train):"),
        table_item(records_table(by_detector, [("detector", "detector"), ("metric", "metric"),
                                               ("spearman", "Spearman")]),
                   _ids("density"), "Each detector's score against each metric (ID test):")])


def generic_section(name: str, records: Sequence[Record]) -> dict[str, Any]:
    """A protocol without a renderer: its records with every scalar field."""
    return protocol_section(name, name, f"Records of the {name} protocol (oodscope.protocols), as in results.json.",
                            [table_item(records_table(records, generic_columns(records)), _ids(name))])


RENDERERS: dict[str, Callable[[Sequence[Record]], dict[str, Any]]] = {
    "failure": failure_section, "unit-tests": unit_tests_section, "scaling": scaling_section,
    "label-noise": label_noise_section, "open-set": open_set_section, "correlation": correlation_section,
    "density": density_section}


def protocol_sections(by_protocol: Mapping[str, Sequence[Record]]) -> list[dict[str, Any]]:
    """The sections of every protocol that was run (``{protocol name: its records}``, in run order)."""
    return [RENDERERS[name](records) if name in RENDERERS else generic_section(name, records)
            for name, records in by_protocol.items() if records]
