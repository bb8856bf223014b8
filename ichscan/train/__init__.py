"""Training and evaluation on data in the RSNA 2019 Intracranial Hemorrhage layout."""
