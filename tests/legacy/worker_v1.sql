-- A database created by whatsapp-worker's own version 1 (before adoption existed): local-time
-- next_attempt_at NOT NULL DEFAULT CURRENT_TIMESTAMP(6), no claimed_at, plain unique keys.
CREATE TABLE sesiones_envio (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    nombre VARCHAR(191) NOT NULL,
    estado ENUM('activa','pausada','cancelada','completada') NOT NULL DEFAULT 'activa',
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_sesiones_envio_nombre (nombre)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE cola_envios (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    sesion_id BIGINT UNSIGNED NOT NULL,
    cliente_id BIGINT NULL,
    telefono VARCHAR(32) NOT NULL,
    mensaje MEDIUMTEXT NOT NULL,
    estado ENUM('pendiente','procesando','enviado','error','desconocido') NOT NULL DEFAULT 'pendiente',
    attempts SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    next_attempt_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    lease_owner VARCHAR(128) NULL,
    lease_token CHAR(32) CHARACTER SET ascii NULL,
    lease_expires_at DATETIME(6) NULL,
    wamid VARCHAR(128) NULL,
    last_error_code INT NULL,
    last_error VARCHAR(1000) NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    sent_at DATETIME(6) NULL,
    UNIQUE KEY uq_cola_envios_sesion_telefono (sesion_id, telefono),
    KEY ix_cola_envios_claim (estado, next_attempt_at, id),
    KEY ix_cola_envios_lease (estado, lease_expires_at),
    CONSTRAINT fk_cola_envios_sesion FOREIGN KEY (sesion_id) REFERENCES sesiones_envio (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE envios_whatsapp (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    cola_id BIGINT UNSIGNED NOT NULL,
    sesion_id BIGINT UNSIGNED NOT NULL,
    cliente_id BIGINT NULL,
    telefono VARCHAR(32) NOT NULL,
    wamid VARCHAR(128) NOT NULL,
    fecha_envio DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE KEY uq_envios_whatsapp_cola (cola_id),
    KEY ix_envios_whatsapp_fecha (fecha_envio),
    KEY ix_envios_whatsapp_cliente (cliente_id, fecha_envio)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE whatsapp_worker_migrations (
    version INT NOT NULL PRIMARY KEY,
    name VARCHAR(200) NOT NULL,
    applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

INSERT INTO whatsapp_worker_migrations (version, name) VALUES (1, 'queue tables');
INSERT INTO sesiones_envio (id, nombre) VALUES (1, 'v1');
INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje, estado) VALUES
  (1, 1, '+51933000001', '{"type":"text","text":{"body":"hola"}}', 'pendiente'),
  (1, 2, '+51933000002', '{"type":"text","text":{"body":"hola"}}', 'enviado'),
  (1, 3, '+51933000003', '{"type":"text","text":{"body":"hola"}}', 'error'),
  (1, 4, '+51933000004', '{"type":"text","text":{"body":"hola"}}', 'desconocido');
