# Copyright 2025 The hf-ches authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Score a preference dataset by CHES, remove the pairs likely to cause likelihood displacement, publish the rest.

The recipe and its argument groups live in `hf_ches.pipeline`, shared with `hf-ches publish` (same options):

    python hub_scripts/ches_filter.py \\
        --dataset_name trl-lib/ultrafeedback_binarized \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --push_to_hub --repo_id your-name/ultrafeedback-ches

The default selection flags the pairs with `entk_w > 0` (column `flagged`) and removes none: on real pairs `entk_w`
ranked the change of log π(chosen) best beyond length and no removal rule beat both random removal and length
(docs/selection.md in the hf-ches repository). `--remove_top`, `--keep_bottom` or `--threshold` with
`--score_column` remove pairs; `--preset sorry-bench` keeps only the lowest 5% by `ln_ches`, as in Razin et al.
(2024), Sec. 6. `--output_dir DIR` instead of `--push_to_hub` writes the files the push would create. `--help` lists
every option.
"""

from hf_ches.pipeline import main  # parses the groups of `hf_ches.pipeline.PUBLISH`, then runs the recipe


if __name__ == "__main__":
    main(stage="publish", prog="ches_filter.py")
