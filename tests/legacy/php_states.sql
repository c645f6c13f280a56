-- A PHP application with session states of its own: drafts (`borrador`, the column's default)
-- and stopped campaigns (`detenida`) besides the ones the worker knows.
CREATE TABLE sesiones_envio (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  nombre VARCHAR(150) NOT NULL,
  estado ENUM('borrador','activa','detenida','completada') NOT NULL DEFAULT 'borrador'
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE cola_envios (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  sesion_id INT NOT NULL,
  cliente_id INT NULL,
  telefono VARCHAR(20) NOT NULL,
  mensaje TEXT NOT NULL,
  estado ENUM('pendiente','procesando','enviado','error') NOT NULL DEFAULT 'pendiente',
  fecha_creacion DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE envios_whatsapp (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  cola_id INT NOT NULL,
  cliente_id INT NULL,
  telefono VARCHAR(20) NOT NULL,
  wamid VARCHAR(100) NULL,
  fecha_envio DATETIME NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

INSERT INTO sesiones_envio (id, nombre, estado) VALUES
  (1, 'recordatorio enero (borrador)', 'borrador'),
  (2, 'recordatorio diciembre', 'activa'),
  (3, 'promo detenida', 'detenida');

INSERT INTO cola_envios (id, sesion_id, cliente_id, telefono, mensaje, estado, fecha_creacion) VALUES
  (1, 1, 11, '+51987100001', '{"type":"text","text":{"body":"borrador"}}', 'pendiente', '2024-01-02 09:00:00'),
  (2, 1, 12, '+51987100002', '{"type":"text","text":{"body":"borrador"}}', 'pendiente', '2024-01-02 09:00:00'),
  (3, 2, 21, '+51987200001', '{"type":"text","text":{"body":"hola"}}', 'pendiente', '2023-12-01 09:00:00'),
  (4, 2, 22, '+51987200002', '{"type":"text","text":{"body":"hola"}}', 'pendiente', '2023-12-01 09:00:00'),
  (5, 2, 23, '+51987200003', '{"type":"text","text":{"body":"hola"}}', 'enviado', '2023-12-01 09:00:00'),
  (6, 3, 31, '+51987300001', '{"type":"text","text":{"body":"promo"}}', 'pendiente', '2023-11-01 09:00:00'),
  (7, 3, 32, '+51987300002', '{"type":"text","text":{"body":"promo"}}', 'pendiente', '2023-11-01 09:00:00');
