"""Convert icetk's tokenizers (text and image) and CogView2's cluster labels into Hugging Face folders.

    python conversion/convert_icetk.py --text-model ice_text.model --image-model ice_image.pt \
        --cluster-labels cluster_label.npy --output converted/icetk

writes `converted/icetk/tokenizer/` (CogLMTokenizer), `image_tokenizer/` (IceVQModel, safetensors) and
`scheduler/` (CogView2Scheduler with the cluster labels). Without `--cluster-labels` the labels are computed by
k-means over the codebook. The logic lives in `coglm_hf.conversion_icetk.convert_icetk`.
"""

from __future__ import annotations

import argparse
import sys

from coglm_hf.conversion_icetk import DTYPES, convert_icetk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-model", required=True, help="icetk's sentencepiece model (ice_text.model)")
    parser.add_argument("--image-model", required=True, help="icetk's image tokenizer checkpoint (ice_image.pt)")
    parser.add_argument("--cluster-labels", help="CogView2's cluster_label.npy; default: k-means over the codebook")
    parser.add_argument("--num-clusters", type=int, help="k-means clusters (default: codebook size / 40)")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    parser.add_argument("--image-config", help="JSON with IceVQModel or icetk HVQVAE arguments (narrow models)")
    parser.add_argument("--text-token-offset", type=int, help="first text id (default: the codebook size)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="image model weights dtype")
    parser.add_argument("--output", required=True, help="output folder (created atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        output = convert_icetk(
            text_model=args.text_model,
            image_model=args.image_model,
            output_dir=args.output,
            cluster_labels=args.cluster_labels,
            num_clusters=args.num_clusters,
            seed=args.seed,
            image_config=args.image_config,
            text_token_offset=args.text_token_offset,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {output}/tokenizer, {output}/image_tokenizer, {output}/scheduler")
    return 0


if __name__ == "__main__":
    sys.exit(main())
