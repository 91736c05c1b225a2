"""The dataset authors' own loading and scoring logic, for tests only (never imported by product
code): our exports must load unchanged with it. One module per dataset, each with its source,
commit and licence."""
