"""Write one lm-eval task config per MMLU subject found in the local data (run once; output committed).

Mirrors lm-eval's tasks/mmlu/_generate_configs.py: the description names the subject with
underscores replaced by spaces. Usage: python _generate_configs.py [DATA_DIR]
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data"
    subjects = sorted(p.name.removesuffix("_test.csv") for p in (data / "mmlu" / "test").glob("*_test.csv"))
    for subject in subjects:
        description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        (HERE / f"prunelab_mmlu_{subject}.yaml").write_text(
            f'include: _mmlu_template_yaml\ntask: prunelab_mmlu_{subject}\ntag: prunelab_mmlu_tasks\n'
            f'dataset_kwargs:\n  subject: {subject}\ndescription: {description!r}\n'.replace("'", '"')
        )
    (HERE / "prunelab_mmlu.yaml").write_text(
        "# All MMLU subjects as one group, micro-averaged (weight_by_size) as lm-eval's mmlu group.\n"
        "group: prunelab_mmlu\ntask:\n  - prunelab_mmlu_tasks\naggregate_metric_list:\n"
        "  - metric: acc\n    weight_by_size: True\nmetadata:\n  version: 2\n"
    )
    print(f"{len(subjects)} subjects")


if __name__ == "__main__":
    main()
