"""The LLM preference trainer (``diffalign.llm``): TRL-schema data, completion log-probs, reference
strategies and the recipe that runs the shared loss core in the shared training loop.

    diffalign train configs/toy_llm_dpo.yaml
"""
