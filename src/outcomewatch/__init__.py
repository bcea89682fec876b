"""outcomewatch: did the customer-visible outcome actually happen?"""

__version__ = "0.1.0"
