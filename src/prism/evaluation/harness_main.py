"""The harness's own command line with PRISM's model registered: lm-eval 0.4.13 finds third-party models only
once their module is imported (it scans no entry points), so `lm_eval --model prism` needs this front door:

    python -m prism.evaluation.harness_main run --model prism --model_args run=runs/demo,system=prism \
        --tasks prism_arc --include_path TASKS
"""

from lm_eval.__main__ import cli_evaluate

import prism.evaluation.harness_model  # noqa: F401  (registers `prism`)

if __name__ == "__main__":
    cli_evaluate()
