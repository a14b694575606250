"""Choose the EELs' exit thresholds on a val split (beyond the thesis).

    python -m threempose.calibrate --checkpoint model.pt --config C.json --out infer.json \\
        [--max-ap-drop 0.01] [--max-images N] [--grid 16] [--records records.json] [--device cpu] [--resume]

1. Every val image of ``C.json``'s data section (synthetic or COCO; the first ``--max-images``
   by id) runs through the whole network once. Per image we record each exit's decoded people
   (COCO results), the GFLOPs each exit would have cost, and each EEL's dynamic-inference score
   (``N`` and Eq. 3.4's confidence, :mod:`threempose.inference.dynamic_exit`). Decoding uses ``C.json``'s
   ``infer`` section; Eq. 3.4's ``c0, c1, c2`` come from its ``infer.eels`` (``1, 1, 1`` for an
   EEL it does not configure). ``--records`` saves all of this as JSON. Each image's record goes
   to the journal ``OUT.partial`` as the image finishes (memory stays flat over thousands of
   images; the progress bar shows the ETA); a killed run leaves it, and ``--resume`` continues
   after the images it holds. The journal names the model file's and the val annotations'
   SHA-256, the infer settings and ``--max-images``: resuming one written with others is an
   error naming the first that differs. It is removed once ``--out`` is written; a run whose
   budget no setting meets keeps it, so ``--resume`` with another ``--max-ap-drop`` or
   ``--grid`` only searches again.
2. A threshold setting (one per EEL) sends each image to the exit that the live rule would
   (:func:`threempose.inference.dynamic_exit.choose_exit`: first EEL with ``N = 0`` or ``conf >=
   threshold``, else the last layer); its AP is COCOeval on the mixed results, its cost the
   mean GFLOPs of the exits taken.
3. Candidate thresholds per EEL: up to ``--grid`` of the observed confidences (evenly spaced
   quantiles, always actual values) and ``1.0`` (never: conf < 0.5 < 1). The settings are
   tried from the cheapest up; the first whose AP is at most ``--max-ap-drop`` (absolute,
   AP in [0, 1]) below the last exit's wins. The ``N = 0`` rule is always on (it is part of
   the method); if even the all-``never`` setting drops AP by more than the budget, nothing is
   written and the exit status is 2.
4. ``--out`` gets ``{"infer": {...}}``: ``C.json``'s infer section with ``exit = "dynamic"`` and
   the chosen thresholds (loadable with :func:`threempose.config.load_config`; pass it to
   ``threempose.infer --config``). The trade-off table (Table 4.3's shape: every exit, the
   dynamic rule with ``C.json``'s thresholds and with the calibrated ones) is printed.

GFLOPs count both flip-test passes (see :mod:`threempose.inference.predictor`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

from threempose.config import load_config
from threempose.inference.calibration import (
    CalibrationError,
    SettingEvaluator,
    assign_exits,
    calibration_rules,
    journal_header,
    journal_records,
    mean_gflops,
    record_exits,
    records_journal,
    saturation_notes,
    search_thresholds,
    trade_off_table,
    val_split,
    write_records,
)
from threempose.inference.dynamic_exit import DYNAMIC, NEVER
from threempose.inference.predictor import Predictor
from threempose.util.cli import check_output_file, entry_point, parse_device
from threempose.util.errors import OutputPathError
from threempose.util.files import atomic_write_json
from threempose.util.journal import journal_path


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m threempose.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a model.pt written by threempose.train")
    p.add_argument("--config", required=True, help="config with the data section (val split) and infer settings")
    p.add_argument("--out", required=True, help="inference config JSON to write ({\"infer\": ...})")
    p.add_argument("--max-ap-drop", type=float, default=0.01,
                   help="largest AP loss vs the last exit, absolute (AP in [0, 1]; default 0.01)")
    p.add_argument("--max-images", type=int, default=0, help="use the first N val images (default all)")
    p.add_argument("--grid", type=int, default=16, help="candidate thresholds per EEL (default 16)")
    p.add_argument("--records", help="also write the per-image records (confidences, per-exit results)")
    p.add_argument("--device", type=parse_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run: skip the images whose records its journal (OUT.partial) holds")
    args = p.parse_args(argv)
    if args.max_ap_drop < 0 or args.grid < 1 or args.max_images < 0:
        p.error("--max-ap-drop must be >= 0, --grid >= 1 and --max-images >= 0")
    return args


def calibrate(args: argparse.Namespace) -> int:
    from threempose.nas.model_file import load_model_file

    out = check_output_file(args.out, "--out")
    if args.records:
        records_path = check_output_file(args.records, "--records")
        if records_path.absolute() == out.absolute():
            raise OutputPathError(f"--records {args.records} is also --out; give two files")
        if records_path.absolute() == journal_path(out).absolute():
            raise OutputPathError(f"--records {args.records} is the journal of --out {args.out}; choose another file")
    cfg = load_config(args.config)
    net, _ = load_model_file(args.checkpoint)
    exit_layers = list(net.genotype.exit_layers)
    eel_layers, final = exit_layers[:-1], exit_layers[-1]
    if not eel_layers:
        raise CalibrationError(f"{args.checkpoint} has no early exit to calibrate (exits: {exit_layers})")
    eels, notes = calibration_rules(cfg.infer, eel_layers)
    infer = dataclasses.replace(cfg.infer, exit=DYNAMIC, eels=eels)
    predictor = Predictor(net, infer, args.device)
    dataset = val_split(cfg.data)
    ids = dataset.image_ids[:args.max_images] if args.max_images else dataset.image_ids
    if not ids:
        raise CalibrationError(f"{args.config}: the val split has no images")
    journal = records_journal(out, journal_header(args.checkpoint, dataset, infer, args.max_images))
    if args.resume and not journal.path.is_file():
        print(f"--resume: no journal {journal.path} of an earlier run; starting from the first image",
              file=sys.stderr)
    journal.open(resume=args.resume)
    try:
        record_exits(predictor, dataset, ids, journal, progress=not args.no_progress)
    except CalibrationError:            # no image readable: nothing to resume
        journal.discard()
        raise
    finally:
        journal.close()                 # a killed or failed run keeps its journal for --resume
    evaluator = SettingEvaluator(dataset.coco, journal_records(journal))
    records = evaluator.records
    reference = evaluator.stats((final,) * len(records))["AP"]
    if reference < 0:
        journal.discard()
        raise CalibrationError(f"{args.config}: the val images hold no annotated person; AP is undefined")
    configured = {e.layer: e.threshold for e in eels}
    choice = search_thresholds(evaluator, eel_layers, final, args.max_ap_drop, args.grid)
    if args.records:
        write_records(args.records, {
            "exit_layers": exit_layers, "eel_layers": eel_layers, "max_ap_drop": args.max_ap_drop,
            "thresholds": {str(k): v for k, v in (choice.thresholds if choice else {}).items()}}, journal)
    dynamic_rows = [("dynamic (config)", assign_exits(records, configured, final))]
    if choice is not None:
        dynamic_rows.append(("dynamic (calibrated)", choice.exits))
    print(f"calibration on {len(records)} val images of {args.config} (flip test "
          f"{'on: GFLOPs count both passes' if infer.flip_test else 'off'})")
    print(trade_off_table(evaluator, exit_layers, dynamic_rows))
    for note in notes + saturation_notes(records, eel_layers):
        print(f"note: {note}")
    if choice is None:
        raise CalibrationError(f"no threshold setting keeps the AP drop within {args.max_ap_drop}: the N = 0 "
                               "rule alone (an EEL that detects nothing stops the image) costs more; "
                               f"nothing written (the records stay in {journal.path}: --resume with another "
                               "--max-ap-drop searches again without the network)")
    chosen = [dataclasses.replace(e, threshold=choice.thresholds[e.layer]) for e in eels]
    atomic_write_json(args.out, {"infer": dataclasses.asdict(dataclasses.replace(infer, eels=chosen))})
    journal.discard()
    final_gflops = mean_gflops(records, (final,) * len(records))
    print("chosen thresholds: " + ", ".join(
        f"EEL {layer}: {t:.6g}" + (" (never)" if t == NEVER else "") for layer, t in choice.thresholds.items()))
    print(f"AP {choice.stats['AP']:.4f} vs {reference:.4f} at the last exit (drop {choice.ap_drop:.4f} <= "
          f"{args.max_ap_drop}); GFLOPs {choice.gflops:.4g} vs {final_gflops:.4g} "
          f"({100.0 * (1 - choice.gflops / final_gflops):.1f}% saved); {evaluator.evaluations} settings scored")
    print(f"wrote {args.out}")
    return 0


@entry_point(also=(ValueError,))
def main(argv: Optional[Sequence[str]] = None) -> int:
    return calibrate(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
