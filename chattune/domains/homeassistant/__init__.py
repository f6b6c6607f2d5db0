"""The Home Assistant task: the reply format, its scorer, and the dataset generator with its piles."""
