"""Module-local checks: which module's backward is wrong.

Every module call recorded on the shadow (`capture`), the adjoint (dot-product) test of
one call per side (`adjoint`), and the search of the module tree that names the suspect
(`search`).
"""
