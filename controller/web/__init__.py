"""HTTP plumbing every route uses, and no domain: the request's session and settings,
the error shape, body limits, pagination and parameter types. The API app
(``controller/api/``) and each domain's endpoints build on it."""
