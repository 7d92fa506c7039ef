"""What the MONAI Bundle configs instantiate: prompt validation (:mod:`.prompts`), one study per prompt
(:mod:`.runner`), cohorts of studies (:mod:`.cohort`) and the MeCoVQA evaluator (:mod:`.evaluator`)."""
