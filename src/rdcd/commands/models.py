"""rdcd models: every name --model accepts."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the model names --model accepts")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import list_models

    def describe(entry) -> str:
        card = entry.card
        if card is None:
            return entry.description
        calibrated = any(t.threshold is not None for t in card.thresholds.values())
        auto = " [--threshold auto]" if calibrated else ""
        if card.beta is not None:
            auto += f" [--score-norm beta {card.beta:g}]"
        from ..models.shipped import int8_file

        int8, why_not = int8_file(card)
        if int8 is not None:
            auto += f" [int8 file on CPU: {int8.name}]"
        elif card.int8 is not None:
            auto += f" [int8 file unusable: {why_not}]"
        return f"{entry.description}{auto} (card: {card.card_path})"

    rows = [(name, "?" if e.dim is None else str(e.dim), describe(e)) for name, e in sorted(list_models().items())]
    width = max(len(r[0]) for r in rows)
    print(f"{'name':<{width}}  {'dim':>4}  description")
    for name, dim, desc in rows:
        print(f"{name:<{width}}  {dim:>4}  {desc}")
    print("\nAlso:\n"
          "  NAME@SIZE            any model at SIZE px input (e.g. sscd-distilled@160)\n"
          "  BASE+pcawDIM         BASE reduced to DIM floats by PCA whitening (+pcaDIM: plain PCA), fitted on\n"
          "                       --background images (rdcd bench: the benchmark's train/), cached and reused;\n"
          "                       e.g. sscd+pcaw128, sscd-distilled@160+pcaw64\n"
          "  student:BACKBONE[:DIM]  an untrained student on any timm backbone\n"
          "  gem:BACKBONE         a backbone's GeM features, no head (ImageNet weights where shipped offline)\n"
          "  gem:STUDENT_FILE     a trained student's GeM features, without its head\n"
          "  model files          .onnx, rdcd .pt, fitted projections .npz, SSCD .torchscript.pt / .torchvision.pt")
    return 0
