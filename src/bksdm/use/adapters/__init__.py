"""Carrying a teacher's adapters onto its students: LoRAs (:mod:`.lora_map`, :mod:`.lora_job`) and ControlNets
(:mod:`.controlnet`), through the weight map of the plan that made the student (``bksdm_plan.yaml``)."""
