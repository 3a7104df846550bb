"""A fault campaign over activation caches and their Hub exports (tests/test_fault_campaign.py runs a slice of it,
recipes/fault_campaign.py all of it): `bases` builds valid caches, `generator` draws seeded faults (`catalog` and
`values` say what they write), `kills` kills builds, and `runner` applies each fault to a fresh copy and says what
a user would have got."""
