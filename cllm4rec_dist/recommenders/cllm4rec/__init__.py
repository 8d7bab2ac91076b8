"""CLLM4Rec (Zhu et al., WWW'24): a frozen LLM whose vocabulary is extended with user and item tokens; mutually
regularised collaborative/content pretraining, then recommendation finetuning over the whole catalogue."""

from cllm4rec_dist.recommenders import Recommender, Variant
from cllm4rec_dist.recommenders.cllm4rec.settings import CLLM4RecSettings

RECOMMENDER = Recommender(
    name="cllm4rec", title="CLLM4Rec", section="model", settings=CLLM4RecSettings,
    recipe="cllm4rec_dist.recommenders.cllm4rec.recipe:CLLM4RecRecipe",
    checks="cllm4rec_dist.recommenders.cllm4rec.checks:check_data", protocol="full_ranking",
    row_sharding=True, evaluate="cllm4rec_dist.recommenders.cllm4rec.evaluate:evaluate_checkpoint",
    variants={  # the paper's ablations (Table 4), one `ablation` setting each
        "cllm4rec": Variant("CLLM4Rec", {"ablation": "none"}),
        "cf": Variant("LLM-CF", {"ablation": "cf"}),
        "prerec": Variant("LLM-PreRec", {"ablation": "prerec"}),
        "fixord": Variant("LLM-FixOrd", {"ablation": "fixord"}),
        "ftall": Variant("LLM-FtAll", {"ablation": "ftall"}, default=False),
        "scratch": Variant("LLM-Scratch", {"ablation": "scratch"}, default=False),
    })
