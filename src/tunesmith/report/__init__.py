"""What a person reads about finished runs. Each view reads the run directory, never a recipe.

numbers.py  the metrics every view shows, in order, and how a number and a change are written
console.py  the terminal: derived numbers at start, the before/after verdict, stages, `tunesmith runs`
html.py     `tunesmith report RUN`: one self-contained HTML page per run
compare.py  `tunesmith compare RUN RUN ...`: several runs overlaid on one page
search.py   a study's trials as a Markdown table, and its plots
"""
