"""A-LLMRec (Kim et al., KDD'24): a frozen CF model, a text encoder and alignment networks whose projections become
soft tokens in a frozen LLM's prompt; scored on the dataset's stored candidates (leave-one-out)."""

from cllm4rec_dist.recommenders import Recommender
from cllm4rec_dist.recommenders.allmrec.settings import ALLMRecSettings

RECOMMENDER = Recommender(
    name="allmrec", title="A-LLMRec", section="allmrec", settings=ALLMRecSettings,
    recipe="cllm4rec_dist.recommenders.allmrec.recipe:ALLMRecRecipe", protocol="candidates")
