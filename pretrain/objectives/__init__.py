"""Pretraining objectives: ITC, ITM, MLM and PrefixLM, and the forward that combines them."""
