"""The recipes the commands run, top to bottom, built from the library beside this folder: train.py (`train`),
evaluate.py (`evaluate`), find_split.py (`find_split`)."""
