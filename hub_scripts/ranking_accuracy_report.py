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
"""Ranking accuracy of a policy (and its reference) on preference pairs (Chen et al. 2024, arXiv 2405.19534).

    python hub_scripts/ranking_accuracy_report.py \\
        --dataset_name trl-lib/ultrafeedback_binarized --dataset_splits test \\
        --model_name_or_path your-name/Qwen2.5-0.5B-DPO --ref_model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --num_samples 1000 --output_dir report/ --push_to_hub --repo_id your-name/ranking-accuracy

The recipe, its argument groups (data, scoring, sampling, report, Hub, output) and the push live in
`hf_ches.report`; `--help` lists every option.
"""

from hf_ches.report import main  # parses the report's groups with `HfArgumentParser`, then runs the recipe


if __name__ == "__main__":
    main(prog="ranking_accuracy_report.py")
