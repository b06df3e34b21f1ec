"""Megatron actor and reference policy of one rank (packed GRPO update through the pipeline schedule)."""
