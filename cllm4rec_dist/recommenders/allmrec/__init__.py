"""A-LLMRec (Kim et al., KDD'24): a frozen CF model, a text encoder and alignment networks whose projections become
soft tokens in a frozen LLM's prompt; scored on the dataset's stored candidates (leave-one-out)."""

from cllm4rec_dist.recommenders import Recommender, Variant
from cllm4rec_dist.recommenders.allmrec.settings import ALLMRecSettings

RECOMMENDER = Recommender(
    name="allmrec", title="A-LLMRec", section="allmrec", settings=ALLMRecSettings,
    recipe="cllm4rec_dist.recommenders.allmrec.recipe:ALLMRecRecipe",
    checks="cllm4rec_dist.recommenders.allmrec.checks:check_data", protocol="candidates",
    variants={
        "allmrec": Variant("A-LLMRec", {}),
        # the paper's TALLRec row: the titles-only prompt with a LoRA-tuned LLM (stage 2 trains the adapter alone;
        # its model is the run's "titles_only" row, reported as "tallrec"). Stage 1 is skipped: nothing of it reaches
        # that prompt.
        "tallrec": Variant("TALLRec (titles only, LoRA)", {"model.adapter": "lora", "allmrec.stage2_soft_tokens": False,
                                                          "allmrec.stage1_epochs": 0}, default=False,
                           rows={"llm/titles_only": "llm/tallrec"}),
    })
