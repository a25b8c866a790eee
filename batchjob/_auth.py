"""``batchjob auth``: get the first token pair for unattended runs.

Constant Contact hands out refresh tokens only through flows that need a person with a browser
once (there is no client-credentials grant). This command guides that one time; afterwards runs
refresh on their own from the token file (format and locking: see ``batchjob._tokens``).

Authorization code flow with PKCE (the default)::

    batchjob auth --client-id ID --token-file ~/.config/batchjob/cc-token.json

1. It prints an authorize URL asking for scope ``campaign_data offline_access`` (offline_access
   is what yields a refresh token), with a PKCE S256 code challenge and a random state.
2. Open it in a browser, log in and allow access. The browser is then sent to the redirect URI
   (default ``https://localhost``; it must be one of the app's redirect URIs) with
   ``?code=...&state=...``. Nothing needs to listen there: the page may fail to load. Copy the
   whole address from the address bar and paste it at the prompt (the bare code works too, but
   then the state cannot be checked).
3. The code is exchanged at the token endpoint (``grant_type=authorization_code`` with the code
   verifier) and the tokens are written to the token file: mode 0600, atomically, under the
   same lock a run takes to refresh. The folder is proven writable (a file is created and
   removed there) before anything is exchanged; if the write still fails, the tokens go to a
   0600 file nearby (see ``batchjob._tokens.rescue_tokens``) and the message says where.

Importing a refresh token you already have::

    batchjob auth --import-refresh-token --client-id ID --token-file PATH < refresh-token.txt

reads the refresh token from stdin (without echo on a terminal), never from the command line
where ``ps`` and shell history would keep it. It refreshes once, which checks the token and, for
rotating tokens, yields the pair that must go in the file (the pasted one is then spent).

Defaults come from the environment: ``--client-id`` from CC_CLIENT_ID, ``--token-file`` from
CC_TOKEN_FILE, ``--token-url`` from CC_TOKEN_URL. CC_CLIENT_SECRET, when set, is sent as HTTP
Basic auth (apps using the plain authorization code flow); without it the client id goes in the
form, as PKCE public clients do. An existing token file is replaced.

Exit status: 0 tokens written; 1 the token server refused or could not be reached, or no input;
2 a usage problem (missing client id or token file, unsafe URL, unwritable directory).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import hashlib
import os
import secrets
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TextIO
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from batchjob._config import (
    DEFAULT_TOKEN_URL,
    TOKEN_URL_ENV,
    check_url_is_safe,
)
from batchjob._errors import ConfigError, ExitCode, TokenEndpointError, TokenError
from batchjob._tokens import (
    CLIENT_ID_ENV,
    CLIENT_SECRET_ENV,
    TOKEN_FILE_ENV,
    Secret,
    TokenFileWriter,
    TokenSet,
    default_token_session,
    is_frozen,
    request_tokens,
    rescue_tokens,
    symlink_message,
    token_file_lock,
    write_token_file,
)

__all__ = ["run_auth_command"]

DEFAULT_AUTHORIZE_URL = "https://authz.constantcontact.com/oauth2/default/v1/authorize"


@dataclass(frozen=True)
class AuthSettings:
    client_id: str
    token_file: Path
    token_url: str
    authorize_url: str
    redirect_uri: str
    scope: str
    client_secret: Secret | None
    import_refresh_token: bool


class LineReader(Protocol):
    """What the command reads from: sys.stdin, or anything that gives lines like it."""

    def readline(self) -> str: ...

    def isatty(self) -> bool: ...


class _UsageError(Exception):
    pass


def _settings_from(args: argparse.Namespace, environ: Mapping[str, str]) -> AuthSettings:
    client_id = (args.client_id or environ.get(CLIENT_ID_ENV, "")).strip()
    if not client_id:
        raise _UsageError(f"pass --client-id or set {CLIENT_ID_ENV}")
    token_file = args.token_file
    if token_file is None and environ.get(TOKEN_FILE_ENV, "").strip():
        token_file = Path(environ[TOKEN_FILE_ENV].strip())
    if token_file is None:
        raise _UsageError(f"pass --token-file or set {TOKEN_FILE_ENV}")
    token_url = args.token_url or environ.get(TOKEN_URL_ENV, "").strip() or DEFAULT_TOKEN_URL
    authorize_url = args.authorize_url or derive_authorize_url(token_url)
    check_url_is_safe("token_url", token_url)
    check_url_is_safe("authorize_url", authorize_url)
    secret = environ.get(CLIENT_SECRET_ENV, "").strip()
    return AuthSettings(
        client_id=client_id,
        token_file=Path(token_file).expanduser(),
        token_url=token_url,
        authorize_url=authorize_url,
        redirect_uri=args.redirect_uri,
        scope=args.scope,
        client_secret=Secret(secret) if secret else None,
        import_refresh_token=bool(args.import_refresh_token),
    )


def derive_authorize_url(token_url: str) -> str:
    """``.../v1/token`` -> ``.../v1/authorize``, so --token-url alone points both somewhere."""
    if token_url == DEFAULT_TOKEN_URL:
        return DEFAULT_AUTHORIZE_URL
    parts = urlsplit(token_url)
    if parts.path.endswith("/token"):
        path = parts.path[: -len("token")] + "authorize"
        return parts._replace(path=path, query="", fragment="").geturl()
    return DEFAULT_AUTHORIZE_URL


def pkce_pair() -> tuple[str, str]:
    """A code verifier (RFC 7636: 43-128 URL-safe characters) and its S256 challenge."""
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return verifier, challenge


def build_authorize_url(settings: AuthSettings, *, state: str, challenge: str) -> str:
    query = urlencode(
        {
            "client_id": settings.client_id,
            "redirect_uri": settings.redirect_uri,
            "response_type": "code",
            "scope": settings.scope,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
        quote_via=quote,
    )
    separator = "&" if "?" in settings.authorize_url else "?"
    return f"{settings.authorize_url}{separator}{query}"


def parse_redirect(text: str, state: str) -> str:
    """The authorization code from a pasted redirect address (checking its state) or bare code."""
    text = text.strip()
    if not text:
        raise TokenError("nothing pasted: run `batchjob auth` again")
    looks_like_url = "://" in text or text.startswith("?") or "code=" in text or "error=" in text
    if not looks_like_url:
        return text
    parts = urlsplit(text)
    # Some servers answer in the fragment (response_mode=fragment); accept either place.
    query = parts.query or parts.fragment or text.lstrip("?")
    params = parse_qs(query)
    if "error" in params:
        error = params["error"][0]
        description = params.get("error_description", [""])[0]
        raise TokenError(
            f"authorization was not granted ({error}{': ' + description if description else ''})"
        )
    codes = params.get("code")
    if not codes or not codes[0]:
        raise TokenError("the pasted address has no code= parameter")
    if params.get("state", [""])[0] != state:
        # Not ours: an old attempt's address, or a forged redirect (CSRF).
        raise TokenError("the pasted address is not from this attempt (state does not match)")
    return codes[0]


def _prepare_directory(path: Path) -> None:
    """Fail before anything is spent: a refresh token used up by a failed write is lost."""
    if path.is_symlink():
        raise _UsageError(symlink_message(path, "--token-file"))
    if path.is_dir():
        raise _UsageError(f"--token-file {path} is a directory")
    if is_frozen(path):
        # Its folder may take new files, but nothing renames over this one: the pair just
        # obtained would only be rescued elsewhere.
        raise _UsageError(
            f"--token-file {path} is immutable or append-only and batchjob replaces it: remove "
            "the flag (chattr -i -a, or chflags nouchg nouappnd)"
        )
    directory = path.parent
    try:
        # 0700: the directory of a secrets file need not be listable by others either.
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise _UsageError(f"cannot create {directory}: {exc.strerror or exc}") from None
    # A real file, not os.access: that answers from permission bits (root passes them all)
    # and knows nothing of a full disk.
    try:
        TokenFileWriter(path).discard()
    except OSError as exc:
        raise _UsageError(f"cannot write to {directory}: {exc.strerror or exc}") from None


def _read_secret_line(stdin: LineReader, stderr: TextIO, prompt: str) -> str:
    if stdin.isatty():
        return getpass.getpass(prompt, stream=stderr)
    return stdin.readline()


async def _exchange_code(settings: AuthSettings, stdin: LineReader, stdout: TextIO) -> TokenSet:
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    url = build_authorize_url(settings, state=state, challenge=challenge)
    print(
        "1. Open this address in a browser, log in to Constant Contact and allow access:\n\n"
        f"   {url}\n\n"
        f"2. The browser then goes to {settings.redirect_uri}?code=... (the page may not load;\n"
        "   that is fine). Copy the whole address from the address bar and paste it here.\n",
        file=stdout,
    )
    print("Redirected address (or the code): ", end="", file=stdout, flush=True)
    line = stdin.readline()
    code = parse_redirect(line, state)
    async with default_token_session() as session:
        try:
            return await request_tokens(
                session,
                settings.token_url,
                {
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": settings.redirect_uri,
                    "code_verifier": verifier,
                },
                client_id=settings.client_id,
                client_secret=settings.client_secret,
            )
        except TokenEndpointError as exc:
            raise TokenError(
                f"the authorization code was refused ({exc.detail}); a code works once and "
                "only for a few minutes, with the same --redirect-uri: run `batchjob auth` again"
            ) from None


async def _import_refresh_token(
    settings: AuthSettings, stdin: LineReader, stderr: TextIO
) -> TokenSet:
    value = _read_secret_line(stdin, stderr, "Refresh token (input hidden): ").strip()
    if not value:
        raise TokenError("no refresh token on stdin")
    async with default_token_session() as session:
        try:
            return await request_tokens(
                session,
                settings.token_url,
                {"grant_type": "refresh_token", "refresh_token": value},
                client_id=settings.client_id,
                client_secret=settings.client_secret,
            )
        except TokenEndpointError as exc:
            raise TokenError(
                f"the refresh token was refused ({exc.detail}): it may be spent, expired, or "
                f"issued to another client id; get a new pair with `batchjob auth --client-id "
                f"{settings.client_id} --token-file {settings.token_file}`"
            ) from None


async def _save(settings: AuthSettings, tokens: TokenSet) -> None:
    path = settings.token_file
    async with token_file_lock(path):
        try:
            write_token_file(path, tokens)
        except OSError as exc:
            problem = exc.strerror or str(exc)
        else:
            return
    # What was pasted is spent now (a code or a rotating refresh token works once).
    try:
        rescued = rescue_tokens(path, tokens)
    except OSError:
        raise TokenError(
            f"could not write {path} ({problem}) nor anywhere else; the tokens just obtained "
            "are lost: fix the problem and run `batchjob auth` again"
        ) from None
    raise TokenError(
        f"could not write {path} ({problem}); the tokens just obtained are in {rescued} "
        f"(mode 0600): move that file over the token file: "
        f"mv {shlex.quote(str(rescued))} {shlex.quote(str(path))}"
    )


async def authorize(
    settings: AuthSettings, *, stdin: LineReader, stdout: TextIO, stderr: TextIO
) -> TokenSet:
    """Run the chosen flow and write the token file; returns what was written."""
    _prepare_directory(settings.token_file)
    if settings.import_refresh_token:
        tokens = await _import_refresh_token(settings, stdin, stderr)
    else:
        tokens = await _exchange_code(settings, stdin, stdout)
    await _save(settings, tokens)
    return tokens


def run_auth_command(
    args: argparse.Namespace,
    *,
    stdin: LineReader | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """``batchjob auth``: returns the exit status. Runs its own event loop."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    try:
        settings = _settings_from(args, os.environ if environ is None else environ)
        tokens = asyncio.run(authorize(settings, stdin=stdin, stdout=stdout, stderr=stderr))
    except (_UsageError, ConfigError) as exc:
        print(f"batchjob auth: error: {exc}", file=stderr)
        return ExitCode.USAGE
    except TokenError as exc:
        print(f"batchjob auth: error: {exc}", file=stderr)
        return ExitCode.FAILED
    until = ""
    if tokens.expires_at is not None:
        stamp = datetime.fromtimestamp(tokens.expires_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
        until = f" (access token valid until {stamp})"
    print(
        f"Saved tokens to {settings.token_file}{until}.\n"
        f"For unattended runs set {TOKEN_FILE_ENV}={settings.token_file} and "
        f"{CLIENT_ID_ENV}={settings.client_id} (or token_file and client_id in the config "
        "file). Runs refresh the tokens on their own from now on.",
        file=stdout,
    )
    return ExitCode.OK
