"""Domains: the tasks, one folder each (reply format, scorer, grammar, data generator), and what every task is built
from: the task interface, task-free metrics, GBNF building blocks."""
