/*
 * regal_archive: an archive_library (PostgreSQL 15+) that hands each completed WAL file to `regal-backup wal
 * daemon` over its UNIX socket, so that archiving starts no process per 16 MB segment.
 *
 * The protocol is the one of regal_dagster/engine/wal_daemon_socket.py: one request per connection, one JSON
 * line each way: {"op": "push", "path": "<absolute path>", "target": "<target>"} and the daemon's reply, which
 * comes only once the file is sealed in the repository ({"ok": true, ...}) or refused ({"ok": false, "error":
 * ..., "hint": ...}). PostgreSQL gets success only for {"ok": true}: the durability rule of docs/pitr.md.
 *
 * Settings (postgresql.conf, reloadable):
 *   regal_archive.socket            the daemon's socket (`wal daemon` prints it when it starts)
 *   regal_archive.target            the postgres_cluster target (empty: the policy's only one)
 *   regal_archive.fallback_command  run (as archive_command is, %p and %f replaced) when no daemon answers,
 *                                   e.g. 'regal-backup --policy ... wal push %p'; empty: the file is not archived
 *                                   this time (PostgreSQL tries again)
 *   regal_archive.log_latency       log each file's round trip (the benchmark reads it)
 *   regal_archive.timeout           seconds to wait for the daemon's answer (default 900)
 */
#include "postgres.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/guc.h"
#if PG_VERSION_NUM >= 160000
#include "archive/archive_module.h"
#else
#include "postmaster/pgarch.h"
#endif

PG_MODULE_MAGIC;

static char *daemon_socket = NULL;
static char *target = NULL;
static char *fallback_command = NULL;
static bool log_latency = false;
static int reply_timeout = 900;

void _PG_init(void);

void
_PG_init(void)
{
	DefineCustomStringVariable("regal_archive.socket", "The UNIX socket of `regal-backup wal daemon`.", NULL,
							   &daemon_socket, "", PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("regal_archive.target", "The postgres_cluster target of the WAL (empty: the only one).",
							   NULL, &target, "", PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("regal_archive.fallback_command",
							   "Shell command archiving %p when no daemon answers (empty: none).", NULL,
							   &fallback_command, "", PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("regal_archive.log_latency", "Log the round trip of each WAL file.", NULL,
							 &log_latency, false, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("regal_archive.timeout", "Seconds to wait for the daemon's answer.", NULL,
							&reply_timeout, 900, 1, 86400, PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	MarkGUCPrefixReserved("regal_archive");
}

static void
json_string(StringInfo out, const char *text)
{
	appendStringInfoChar(out, '"');
	for (const unsigned char *c = (const unsigned char *) text; *c; c++)
	{
		if (*c == '"' || *c == '\\')
			appendStringInfo(out, "\\%c", *c);
		else if (*c < 0x20)
			appendStringInfo(out, "\\u%04x", *c);
		else
			appendStringInfoChar(out, (char) *c);
	}
	appendStringInfoChar(out, '"');
}

/* 1: sealed; 0: refused (said in the log); -1: no daemon answered (why in *absent) */
static int
ask_daemon(const char *path, const char **absent)
{
	struct sockaddr_un address;
	StringInfoData request;
	char		reply[8192];
	size_t		got = 0;
	int			fd;
	time_t		deadline = time(NULL) + reply_timeout;

	if (daemon_socket[0] == '\0' || strlen(daemon_socket) >= sizeof(address.sun_path))
	{
		*absent = daemon_socket[0] ? "regal_archive.socket is too long for a UNIX socket" : "regal_archive.socket is not set";
		return -1;
	}
	memset(&address, 0, sizeof(address));
	address.sun_family = AF_UNIX;
	strlcpy(address.sun_path, daemon_socket, sizeof(address.sun_path));
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *) &address, sizeof(address)) < 0)
	{
		*absent = strerror(errno);
		if (fd >= 0)
			close(fd);
		return -1;
	}
	initStringInfo(&request);
	appendStringInfoString(&request, "{\"op\": \"push\", \"path\": ");
	json_string(&request, path);
	appendStringInfoString(&request, ", \"target\": ");
	if (target[0])
		json_string(&request, target);
	else
		appendStringInfoString(&request, "null");
	appendStringInfoString(&request, "}\n");
	for (int sent = 0; sent < request.len;)
	{
		ssize_t		n = send(fd, request.data + sent, request.len - sent, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
		{
			*absent = "the daemon went away before it answered";
			close(fd);
			pfree(request.data);
			return -1;
		}
		sent += n;
	}
	pfree(request.data);
	while (got == 0 || reply[got - 1] != '\n')
	{
		struct pollfd wait = {.fd = fd,.events = POLLIN};
		int			left = (int) (deadline - time(NULL));
		ssize_t		n;

		if (left <= 0 || got >= sizeof(reply) - 1)
		{
			*absent = left <= 0 ? "the daemon did not answer within regal_archive.timeout" : "the daemon's answer is too long";
			close(fd);
			return -1;
		}
		if (poll(&wait, 1, left > 1 ? 1000 : left * 1000) < 0 && errno != EINTR)
			break;
		if (!(wait.revents & (POLLIN | POLLHUP | POLLERR)))
			continue;			/* the daemon is still sealing it */
		n = recv(fd, reply + got, sizeof(reply) - 1 - got, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
		{
			*absent = "the daemon went away before it answered";
			close(fd);
			return -1;
		}
		got += n;
	}
	close(fd);
	reply[got] = '\0';
	if (strncmp(reply, "{\"ok\": true", 11) == 0)
		return 1;
	reply[got - 1] = '\0';
	ereport(WARNING, (errmsg("regal_archive: the wal daemon did not archive \"%s\": %s", path, reply)));
	return 0;
}

static bool
run_fallback(const char *path, const char *file)
{
	StringInfoData command;
	int			rc;

	initStringInfo(&command);
	for (const char *c = fallback_command; *c; c++)
	{
		if (c[0] == '%' && c[1] == 'p')
			appendStringInfoString(&command, path), c++;
		else if (c[0] == '%' && c[1] == 'f')
			appendStringInfoString(&command, file), c++;
		else if (c[0] == '%' && c[1] == '%')
			appendStringInfoChar(&command, '%'), c++;
		else
			appendStringInfoChar(&command, *c);
	}
	fflush(NULL);
	rc = system(command.data);
	pfree(command.data);
	if (rc != 0)
		ereport(WARNING, (errmsg("regal_archive: regal_archive.fallback_command failed on \"%s\" (status %d)",
								 file, rc)));
	return rc == 0;
}

static bool
regal_archive_file(const char *file, const char *path)
{
	char	   *absolute = make_absolute_path(path);
	const char *absent = NULL;
	struct timespec started,
				ended;
	int			answer;
	bool		archived;

	clock_gettime(CLOCK_MONOTONIC, &started);
	answer = ask_daemon(absolute, &absent);
	if (answer >= 0)
		archived = answer == 1;
	else if (fallback_command[0] == '\0')
	{
		ereport(WARNING, (errmsg("regal_archive: no wal daemon answered on %s (%s): \"%s\" is not archived yet",
								 daemon_socket, absent, file),
						  errhint("Start `regal-backup wal daemon`, or set regal_archive.fallback_command.")));
		archived = false;
	}
	else
	{
		ereport(LOG, (errmsg("regal_archive: no wal daemon answered on %s (%s): archiving \"%s\" with "
							 "regal_archive.fallback_command", daemon_socket, absent, file)));
		archived = run_fallback(path, file);
	}
	clock_gettime(CLOCK_MONOTONIC, &ended);
	if (log_latency)
		ereport(LOG, (errmsg("regal_archive: %s %s in %.3f ms", file, archived ? "archived" : "NOT archived",
							 (ended.tv_sec - started.tv_sec) * 1000.0 + (ended.tv_nsec - started.tv_nsec) / 1e6)));
	free(absolute);
	return archived;
}

#if PG_VERSION_NUM >= 160000
static bool
regal_archive_file_state(ArchiveModuleState *state, const char *file, const char *path)
{
	return regal_archive_file(file, path);
}

static const ArchiveModuleCallbacks callbacks = {.archive_file_cb = regal_archive_file_state};

const ArchiveModuleCallbacks *
_PG_archive_module_init(void)
{
	return &callbacks;
}
#else
void		_PG_archive_module_init(ArchiveModuleCallbacks *cb);

void
_PG_archive_module_init(ArchiveModuleCallbacks *cb)
{
	cb->archive_file_cb = regal_archive_file;
}
#endif
