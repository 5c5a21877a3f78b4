"""Accounting: prices and cost now; budgets and usage records with the tenancy issue."""
