#!/usr/bin/env python
"""Convert an official CogView2 SwissArmyTransformer model folder to a coglm_hf checkpoint.

    python conversion/convert_sat_checkpoint.py --input ~/.sat_models/coglm --output converted/coglm

The model kind (coglm, cogview2-dsr, cogview2-itersr) is detected from the checkpoint keys. The output folder holds
safetensors weights, config.json and the model code, so it loads with ``AutoModel.from_pretrained(dir,
trust_remote_code=True)`` even where coglm_hf is not installed.
"""

import argparse
import sys

from coglm_hf.convert_sat import DTYPES, convert_sat_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="SAT model folder (holds 'latest' and '<iteration>/')")
    parser.add_argument("--output", required=True, help="folder to write (created atomically)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 2GB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        out = convert_sat_checkpoint(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite,
                                     max_shard_size=args.max_shard_size)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
