// The credentials key the test database is set up with (global-setup) and the
// test servers and workers use.
export const TEST_CREDENTIALS_KEY = "test-credentials-key-of-at-least-32-characters";
