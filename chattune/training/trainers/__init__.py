"""Trainers: TRL's trainers as chattune runs them: the shared TrainingArguments, SFT, preference methods, the DPO
reference log-probs, task metrics while training."""
