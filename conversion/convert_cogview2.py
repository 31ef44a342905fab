#!/usr/bin/env python
"""Convert the official CogView2 release into one pipeline folder (same as `coglm-hf convert`).

    python conversion/convert_cogview2.py --sat-dir ~/.sat_models --cluster-labels CogView2/cluster_label.npy \
        --text-model ~/.icetk_models/ice_text.model --image-model ~/.icetk_models/ice_image.pt \
        --dtype float16 --output converted/cogview2

The folder loads with `CogView2Pipeline.from_pretrained(dir)` (coglm_hf installed) or with
`DiffusionPipeline.from_pretrained(dir, custom_pipeline=f"{dir}/pipeline_cogview2.py", trust_remote_code=True)`.
The logic lives in `coglm_hf.convert_cogview2.convert_cogview2`; run with `--help` for every option.
"""

import sys

from coglm_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
