"""The reproduction pipeline: the paper's Table 1 and Figures 3-6 from the project's commands."""
