"""``aft-vit export``: an ONNX file of a model with its weights, checked in onnxruntime against PyTorch.

The model is a registry name with a pretrained tag, ``hf-hub:ORG/NAME``, ``local-dir:PATH`` or a training
checkpoint (``--checkpoint``), as for ``aft-vit eval``. The batch is always dynamic; for models whose output does
not depend on a fixed grid (AFT-conv: no position embedding, no per-token parameters) height and width are
dynamic too. torch's default (dynamo) exporter writes the file; the check runs it in onnxruntime on a real photo
at batch 1 and 3, and, where the size is dynamic, at a second size, and reports the largest difference from
PyTorch. The file is written next to its destination and moved there only once it passed.

Needs the ``onnx`` extra (``pip install 'aft-vit[onnx]'``: onnx, onnxscript, onnxruntime).
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from timm.data import create_transform

from . import evaluate
from .checkpoint import atomic_file
from .errors import UserInputError


def spatially_dynamic(model: torch.nn.Module) -> bool:
    """Whether the model takes any multiple of its patch size with nothing resampled (AFT-conv)."""
    return bool(getattr(model, 'dynamic_img_size', False)) and getattr(model, 'pos_embed', None) is None \
        and getattr(model, 'cls_token', None) is None


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, dynamic_hw: bool) -> None:
    """torch.onnx.export (dynamo) with a dynamic batch and, with ``dynamic_hw``, dynamic height and width."""
    auto = torch.export.Dim.AUTO
    dims = {0: auto, 2: auto, 3: auto} if dynamic_hw else {0: auto}
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), input_names=['x'], output_names=['logits'],
                          dynamic_shapes={'x': dims}, external_data=False, verbose=False)  # one self-contained file


def _photo(image: Optional[str]) -> Image.Image:
    if image:
        try:
            with Image.open(image) as img:
                return img.convert('RGB')
        except (FileNotFoundError, OSError) as e:
            raise UserInputError(f'cannot read --image {image}: {e}') from None
    try:
        from skimage.data import chelsea
    except ImportError:
        raise UserInputError('pass --image PHOTO to check the file on (or pip install scikit-image for its cat)') from None
    return Image.fromarray(chelsea())


def check_onnx(path: Path, model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> List[Tuple[Tuple[int, ...], float]]:
    """Run the file in onnxruntime on each input; returns (input shape, max |onnx - torch|) pairs."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    results = []
    with torch.no_grad():
        for x in inputs:
            expected = model(x).numpy()
            got = session.run(None, {name: x.numpy()})[0]
            results.append((tuple(x.shape), float(np.abs(got - expected).max())))
    return results


def check_inputs(photo: torch.Tensor, dynamic_hw: bool, stride: int) -> List[torch.Tensor]:
    """The photo at batch 1 and 3 (two more crops of it, flipped and shifted), and with a dynamic size also at
    about 1.25x its height and 1x its width, rounded to the model's stride."""
    batch3 = torch.stack([photo, photo.flip(-1), photo.roll(7, dims=-2)])
    inputs = [photo.unsqueeze(0), batch3]
    if dynamic_hw:
        height = max(stride, round(photo.shape[-2] * 1.25 / stride) * stride)
        resized = torch.nn.functional.interpolate(batch3, size=(height, photo.shape[-1]), mode='bilinear')
        inputs += [resized[:1], resized]
    return inputs


def export(args: argparse.Namespace) -> Dict[str, object]:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserInputError(f'aft-vit export needs the onnx extra ({e.name} is missing): '
                             "pip install 'aft-vit[onnx]'") from None
    loaded = evaluate.load_model(args.model, args.checkpoint, use_ema=args.use_ema, num_classes=args.num_classes)
    model = loaded.model.eval()
    transform = create_transform(**loaded.data_config())
    photo = transform(_photo(args.image))
    dynamic_hw = spatially_dynamic(model)
    stride = getattr(model, 'input_stride', (1, 1))[0]  # pixels per token (patch size, or a conv stem's stride)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        export_onnx(model, photo.unsqueeze(0).repeat(2, 1, 1, 1), tmp, dynamic_hw)
        differences = check_onnx(tmp, model, check_inputs(photo, dynamic_hw, stride))
        worst = max(d for _, d in differences)
        if worst > args.atol:
            raise UserInputError(f'the exported file differs from PyTorch by up to {worst:.3g} (> --atol {args.atol}): '
                                 + ', '.join(f'{tuple(s)}: {d:.3g}' for s, d in differences))
    return dict(model=loaded.name, output=str(out), dynamic=['batch'] + (['height', 'width'] if dynamic_hw else []),
                differences=differences)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='aft-vit export', description=__doc__.split('\n\n')[0])
    evaluate.add_model_source_args(parser, 'export')
    parser.add_argument('--output', required=True, help='ONNX file to write')
    parser.add_argument('--image', default=None, help='photo to check the file on (default: skimage\'s chelsea)')
    parser.add_argument('--atol', type=float, default=1e-4, help='largest accepted |onnxruntime - PyTorch|')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    result = export(build_parser().parse_args(argv))
    print(f'{result["output"]}: {result["model"]}, dynamic {", ".join(result["dynamic"])}')
    for shape, difference in result['differences']:
        print(f'  onnxruntime vs PyTorch at input {"x".join(map(str, shape))}: max |difference| {difference:.3g}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
